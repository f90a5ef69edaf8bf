//! The final line of every run.
//!
//! The hypervisor prints exactly one end line as its last serial output; the host tools in `boot/`
//! parse it with [`EndLine::parse`]. Keeping writer and parser in one place keeps them in step.

use core::fmt;

/// Prefix that starts the end line.
pub const END_MARKER: &str = "HV-END";

/// How a run of the hypervisor ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Everything configured ran and ended as expected.
    Success,
    /// A host fault, a panic, an unusable CPU or a VM that failed.
    Failure,
}

impl RunStatus {
    /// Value written to QEMU's `isa-debug-exit` port; QEMU exits with `(value << 1) | 1`.
    pub const fn debug_exit_code(self) -> u32 {
        match self {
            RunStatus::Success => 0x10,
            RunStatus::Failure => 0x11,
        }
    }

    /// QEMU's process exit code for this status when `isa-debug-exit` is present.
    pub const fn qemu_exit_code(self) -> i32 {
        ((self.debug_exit_code() << 1) | 1) as i32
    }

    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Success => "success",
            RunStatus::Failure => "failure",
        }
    }
}

/// The parsed end line: `HV-END status=<success|failure> reason="<text>"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndLine<'a> {
    /// Overall status.
    pub status: RunStatus,
    /// Human-readable reason (never contains a double quote or newline).
    pub reason: &'a str,
}

impl fmt::Display for EndLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{END_MARKER} status={} reason=\"", self.status.as_str())?;
        // The reason is free text from panics and faults: keep the line parseable.
        for c in self.reason.chars() {
            match c {
                '"' => f.write_str("'")?,
                '\n' | '\r' => f.write_str(" ")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

impl<'a> EndLine<'a> {
    /// Parses one line; `None` if it is not an end line.
    pub fn parse(line: &'a str) -> Option<Self> {
        let rest = line.trim_end().strip_prefix(END_MARKER)?.strip_prefix(" status=")?;
        let (status, rest) = rest.split_once(' ')?;
        let status = match status {
            "success" => RunStatus::Success,
            "failure" => RunStatus::Failure,
            _ => return None,
        };
        let reason = rest.strip_prefix("reason=\"")?.strip_suffix('"')?;
        Some(EndLine { status, reason })
    }

    /// The last end line in a serial log, if any.
    pub fn find_last(log: &'a str) -> Option<Self> {
        log.lines().rev().find_map(Self::parse)
    }
}

/// A fixed-capacity text buffer, for messages built where the heap may be unusable (panics,
/// exceptions). Text that does not fit is cut at a character boundary and marked with `...`.
pub struct LineBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> Default for LineBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LineBuf<N> {
    const ELLIPSIS: &'static str = "...";

    /// An empty buffer.
    pub const fn new() -> Self {
        LineBuf { buf: [0; N], len: 0, truncated: false }
    }

    /// The text written so far, ending in `...` if some was cut.
    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever copied in, so this cannot fail.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> fmt::Write for LineBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.truncated {
            return Ok(());
        }
        let room = N - self.len;
        if s.len() <= room {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
            return Ok(());
        }
        self.truncated = true;
        // Keep room for the ellipsis, cutting `s` (and if needed earlier text) on char boundaries.
        let keep_total = N.saturating_sub(Self::ELLIPSIS.len());
        let mut cut = s.len().min(keep_total.saturating_sub(self.len.min(keep_total)));
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        if self.len > keep_total {
            self.len = keep_total;
            while core::str::from_utf8(&self.buf[..self.len]).is_err() {
                self.len -= 1;
            }
        }
        self.buf[self.len..self.len + cut].copy_from_slice(&s.as_bytes()[..cut]);
        self.len += cut;
        let tail = Self::ELLIPSIS.len().min(N - self.len);
        self.buf[self.len..self.len + tail].copy_from_slice(&Self::ELLIPSIS.as_bytes()[..tail]);
        self.len += tail;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn end_line_round_trips() {
        let line = EndLine { status: RunStatus::Failure, reason: "exception #PF at 0x1000" };
        let text = line.to_string();
        assert_eq!(text, "HV-END status=failure reason=\"exception #PF at 0x1000\"");
        assert_eq!(EndLine::parse(&text), Some(line));
    }

    #[test]
    fn quotes_and_newlines_in_reasons_keep_the_line_parseable() {
        let text = EndLine { status: RunStatus::Success, reason: "a \"b\"\nc" }.to_string();
        assert_eq!(EndLine::parse(&text).unwrap().reason, "a 'b' c");
    }

    #[test]
    fn last_end_line_wins_and_noise_is_ignored() {
        let log = "boot\nHV-END status=success reason=\"x\"\nHV-END status=failure reason=\"y\"\r\ntrailing";
        let end = EndLine::find_last(log).unwrap();
        assert_eq!(end.status, RunStatus::Failure);
        assert_eq!(end.reason, "y");
        assert_eq!(EndLine::parse("HV-END status=maybe reason=\"\""), None);
        assert_eq!(EndLine::find_last("no end here"), None);
    }

    #[test]
    fn line_buf_keeps_short_text_and_marks_cut_text() {
        use core::fmt::Write;
        let mut short = LineBuf::<16>::new();
        write!(short, "ab{}", 12).unwrap();
        assert_eq!(short.as_str(), "ab12");
        let mut long = LineBuf::<10>::new();
        write!(long, "0123456789abcdef").unwrap();
        write!(long, "more").unwrap();
        assert_eq!(long.as_str(), "0123456...");
        let mut multibyte = LineBuf::<6>::new();
        write!(multibyte, "€€€").unwrap();
        assert_eq!(multibyte.as_str(), "€...");
        let mut exact = LineBuf::<4>::new();
        write!(exact, "abcd").unwrap();
        assert_eq!(exact.as_str(), "abcd");
    }

    #[test]
    fn qemu_exit_codes_differ_from_plain_qemu_codes() {
        assert_eq!(RunStatus::Success.qemu_exit_code(), 33);
        assert_eq!(RunStatus::Failure.qemu_exit_code(), 35);
    }
}
