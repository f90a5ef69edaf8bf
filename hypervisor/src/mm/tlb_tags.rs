//! TLB tags (SVM ASIDs, VMX VPIDs): one per vCPU, so translations one vCPU leaves in a CPU's
//! TLB are never used by another.
//!
//! When the tags run out, vCPUs share the last one and their backend flushes it on every
//! entry: slower, never wrong. A freed tag may still have entries on some CPU; backends flush a
//! vCPU's tag whenever it starts on a CPU it did not run on last, which covers reuse too.

use alloc::vec;
use alloc::vec::Vec;

/// A tag handed out by [`TagPool::take`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The ASID or VPID (never 0, which is the host's).
    pub value: u32,
    /// Shared with other vCPUs: flush it on every entry.
    pub shared: bool,
}

/// Tags `1..=last`, the last kept as the shared fallback.
pub struct TagPool {
    used: Vec<bool>,
}

impl TagPool {
    /// A pool of tags 1 to `last` (at least 1).
    pub fn new(last: u32) -> Self {
        TagPool { used: vec![false; last.max(1) as usize] }
    }

    /// A free tag, or the shared one when none is left.
    pub fn take(&mut self) -> Tag {
        let private = self.used.len() - 1;
        match self.used[..private].iter().position(|used| !used) {
            Some(index) => {
                self.used[index] = true;
                Tag { value: index as u32 + 1, shared: false }
            }
            None => Tag { value: self.used.len() as u32, shared: true },
        }
    }

    /// Returns a tag from [`Self::take`].
    pub fn give_back(&mut self, tag: Tag) {
        if !tag.shared {
            if let Some(used) = self.used.get_mut(tag.value as usize - 1) {
                *used = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_private_until_they_run_out_then_shared() {
        let mut pool = TagPool::new(3);
        let a = pool.take();
        let b = pool.take();
        assert_eq!((a, b), (Tag { value: 1, shared: false }, Tag { value: 2, shared: false }));
        assert_eq!(pool.take(), Tag { value: 3, shared: true });
        assert_eq!(pool.take(), Tag { value: 3, shared: true });
        pool.give_back(a);
        pool.give_back(Tag { value: 3, shared: true });
        assert_eq!(pool.take(), Tag { value: 1, shared: false }, "a freed tag is reused");
        let mut single = TagPool::new(1);
        assert!(single.take().shared, "one tag: everybody shares it");
    }
}
