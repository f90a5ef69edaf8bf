//! The host console shared by every VM and the hypervisor's own log: lines never mix.
//!
//! Each VM's text arrives in pieces (a prompt is written before its line ends). Whoever
//! writes while another VM's line is still open first ends that line; the interrupted VM's
//! next piece then starts a fresh line with its prefix again. Every line of a VM starts with
//! `[NAME] `, so nothing a guest prints can begin a line the tools parse (`VM-END`, `HV-END`).

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
}
