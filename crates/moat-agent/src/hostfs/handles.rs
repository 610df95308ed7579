//! Open files of a host mount. The host keeps no handles (calls name paths), so a handle only
//! remembers what a later write needs to know: whether the file was opened with `O_APPEND`.

use std::collections::HashSet;

#[derive(Debug)]
pub(crate) struct Handles {
    next: u64,
    appending: HashSet<u64>,
}

impl Default for Handles {
    fn default() -> Handles {
        Handles { next: 1, appending: HashSet::new() }
    }
}

impl Handles {
    pub(crate) fn open(&mut self, append: bool) -> u64 {
        let fh = self.next;
        self.next += 1;
        if append {
            self.appending.insert(fh);
        }
        fh
    }

    pub(crate) fn appends(&self, fh: u64) -> bool {
        self.appending.contains(&fh)
    }

    pub(crate) fn release(&mut self, fh: u64) {
        self.appending.remove(&fh);
    }
}
