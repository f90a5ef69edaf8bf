//! The host console shared by every VM and the hypervisor's own log: lines never mix.
//!
//! Each VM's text arrives in pieces (a prompt is written before its line ends). Whoever
//! writes while another VM's line is still open first ends that line; the interrupted VM's
//! next piece then starts a fresh line with its prefix again. Every line of a VM starts with
//! `[NAME] `, so nothing a guest prints can begin a line the tools parse (`VM-END`, `HV-END`).
//!
//! With `console = raw`, the VM that has the input also sends its bytes unaltered, as
//! `HV-RAW <hex>` lines of their own: a terminal (`boot run`) shows those instead of that VM's
//! sanitized lines, escape sequences intact; logs keep the sanitized lines.

/// Starts a line carrying a VM's raw console bytes, in hexadecimal.
pub const RAW_RECORD: &str = "HV-RAW ";

/// Which VM, if any, has a line open on the host console.
#[derive(Debug, Default)]
pub struct ConsoleLines {
    open: Option<usize>,
}

impl ConsoleLines {
    /// A console with no open line.
    pub const fn new() -> Self {
        ConsoleLines { open: None }
    }

    /// Writes a piece of VM `vm`'s console (named `name`): `text` holds no newline; `ends_line`
    /// finishes the line.
    pub fn vm_text(&mut self, vm: usize, name: &str, text: &str, ends_line: bool, out: &mut dyn FnMut(&str)) {
        if self.open != Some(vm) {
            self.close(out);
            out("[");
            out(name);
            out("] ");
        }
        out(text);
        if ends_line {
            out("\n");
            self.open = None;
        } else {
            self.open = Some(vm);
        }
    }

    /// Writes `bytes` of the VM with the input as one `HV-RAW` line.
    pub fn raw(&mut self, bytes: &[u8], out: &mut dyn FnMut(&str)) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.close(out);
        out(RAW_RECORD);
        let mut chunk = [0u8; 128];
        for piece in bytes.chunks(chunk.len() / 2) {
            for (i, &b) in piece.iter().enumerate() {
                chunk[2 * i] = HEX[usize::from(b >> 4)];
                chunk[2 * i + 1] = HEX[usize::from(b & 0xf)];
            }
            out(core::str::from_utf8(&chunk[..2 * piece.len()]).expect("hex digits"));
        }
        out("\n");
    }

    /// Ends any open VM line, so a host line can follow on a line of its own.
    pub fn close(&mut self, out: &mut dyn FnMut(&str)) {
        if self.open.take().is_some() {
            out("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn prompts_continue_their_line_until_someone_else_writes() {
        let mut lines = ConsoleLines::new();
        let mut text = String::new();
        let mut out = |s: &str| text.push_str(s);
        lines.vm_text(0, "a", "login: ", false, &mut out);
        lines.vm_text(0, "a", "root", true, &mut out);
        lines.vm_text(0, "a", "$ ", false, &mut out);
        lines.vm_text(1, "b", "booting", true, &mut out);
        lines.vm_text(0, "a", "ls", true, &mut out);
        lines.vm_text(1, "b", "half", false, &mut out);
        lines.close(&mut out);
        out("HV-END status=success\n");
        assert_eq!(text, "[a] login: root\n[a] $ \n[b] booting\n[a] ls\n[b] half\nHV-END status=success\n");
    }

    #[test]
    fn raw_bytes_go_out_as_hex_on_a_line_of_their_own() {
        let mut lines = ConsoleLines::new();
        let mut text = String::new();
        let mut out = |s: &str| text.push_str(s);
        lines.vm_text(0, "a", "$ ", false, &mut out);
        lines.raw(b"\x1b[2J\r\n", &mut out);
        let long = [0xffu8; 200];
        lines.raw(&long, &mut out);
        assert!(text.starts_with("[a] $ \nHV-RAW 1b5b324a0d0a\nHV-RAW ffff"), "{text}");
        assert!(text.ends_with(&alloc::format!("{}\n", "ff".repeat(200))));
    }
}
