//! What a terminal shows of the serial stream when the hypervisor runs with `console = raw`:
//! the VM that has the input appears as its own bytes (its `HV-RAW` records decoded, escape
//! sequences intact, so full-screen programs work), everything else as the prefixed lines.
//! The log keeps the prefixed, sanitized lines and drops the raw records.

use hypervisor::console::RAW_RECORD;

/// Announces which VM has the input: `HV-CONSOLE: input goes to vm NAME[; ...]`.
const INPUT_LINE: &str = "HV-CONSOLE: input goes to vm ";

/// Turns serial bytes into terminal bytes, a line at a time.
#[derive(Default)]
pub struct TerminalView {
    /// The VM whose raw bytes are shown instead of its lines.
    focus: Option<String>,
    /// The line received so far.
    partial: Vec<u8>,
}

impl TerminalView {
    /// Takes serial bytes; returns what the terminal should show for the lines they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut shown = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.partial.push(byte);
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            let text = line.strip_suffix(b"\r").unwrap_or(&line);
            self.show_line(text, &mut shown);
        }
        shown
    }

    fn show_line(&mut self, line: &[u8], shown: &mut Vec<u8>) {
        if let Some(raw) = line.strip_prefix(RAW_RECORD.as_bytes()).and_then(decode_hex) {
            shown.extend_from_slice(&raw);
            return;
        }
        if let Some(rest) = line.strip_prefix(INPUT_LINE.as_bytes()) {
            let name = rest.split(|&b| b == b';').next().unwrap_or_default();
            self.focus = Some(String::from_utf8_lossy(name).into_owned());
        }
        let own_line = self.focus.as_ref().is_some_and(|vm| {
            line.strip_prefix(b"[").and_then(|l| l.strip_prefix(vm.as_bytes())).is_some_and(|l| l.starts_with(b"] "))
        });
        if !own_line {
            shown.extend_from_slice(line);
            shown.extend_from_slice(b"\r\n");
        }
    }
}

/// The serial bytes without the raw records: what the log keeps.
pub fn without_raw_records(serial: &[u8]) -> Vec<u8> {
    serial
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| !line.starts_with(RAW_RECORD.as_bytes()))
        .flatten()
        .copied()
        .collect()
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    hex.chunks(2).map(|pair| Some((digit(pair[0])? << 4 | digit(pair[1])?) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b"INFO  hypervisor starting\r\n\
        HV-CONSOLE: input goes to vm a; Ctrl-] moves it to the next VM\r\n\
        [a] .[1mbold.[0m\r\n\
        HV-RAW 1b5b316d626f6c641b5b306d0d0a\r\n\
        [b] booting\r\n\
        HV-CONSOLE: input goes to vm b\r\n\
        [a] later\r\n\
        [b] shown raw now\r\n\
        HV-RAW 7a\r\n";

    #[test]
    fn the_vm_with_the_input_is_shown_raw_and_the_others_as_lines() {
        let mut view = TerminalView::default();
        // Bytes arrive in arbitrary pieces.
        let shown: Vec<u8> = STREAM.chunks(7).flat_map(|piece| view.feed(piece)).collect();
        let expected: &[u8] = b"INFO  hypervisor starting\r\n\
            HV-CONSOLE: input goes to vm a; Ctrl-] moves it to the next VM\r\n\
            \x1b[1mbold\x1b[0m\r\n\
            [b] booting\r\n\
            HV-CONSOLE: input goes to vm b\r\n\
            [a] later\r\n\
            z";
        assert_eq!(String::from_utf8_lossy(&shown), String::from_utf8_lossy(expected));
    }

    #[test]
    fn the_log_keeps_the_sanitized_lines_only() {
        let log = without_raw_records(STREAM);
        let text = String::from_utf8_lossy(&log);
        assert!(!text.contains("HV-RAW"), "{text}");
        assert!(text.contains("[a] .[1mbold.[0m\r\n[b] booting\r\n"), "{text}");
    }

    #[test]
    fn a_malformed_record_is_shown_as_it_came() {
        let mut view = TerminalView::default();
        assert_eq!(view.feed(b"HV-RAW 1g\n"), b"HV-RAW 1g\r\n");
        // A VM named like another's prefix is not mistaken for it.
        view.feed(b"HV-CONSOLE: input goes to vm a\n");
        assert_eq!(view.feed(b"[ab] x\n"), b"[ab] x\r\n");
    }
}
