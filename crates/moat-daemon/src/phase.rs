//! The sandbox state machine: which phase may follow which.

use moat_api::Phase;

/// Whether a sandbox in `from` may move to `to`.
pub fn allowed(from: Phase, to: Phase) -> bool {
    use Phase::*;
    matches!(
        (from, to),
        (Creating, Booting)
            | (Booting, Running)
            | (Running, Stopping)
            | (Booting, Stopping)
            | (Stopping, Stopped)
            | (Stopping, Expired)
            | (Stopping, Paused)
            // A pause that failed to save leaves the VM running.
            | (Stopping, Running)
            // A stopped, expired or failed sandbox keeps its disk and can be started again; a
            // paused one continues where it was.
            | (Stopped | Expired | Failed | Paused, Booting)
            // Anything live can fail: QEMU dies, the boot times out, the daemon restarts mid-boot.
            | (Creating | Booting | Running | Stopping, Failed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    #[test]
    fn the_happy_path_and_restarts_are_allowed() {
        let path = [Creating, Booting, Running, Stopping, Stopped, Booting, Running];
        for w in path.windows(2) {
            assert!(allowed(w[0], w[1]), "{} -> {}", w[0], w[1]);
        }
        assert!(allowed(Stopping, Expired) && allowed(Expired, Booting) && allowed(Failed, Booting));
        assert!(allowed(Stopping, Paused) && allowed(Paused, Booting));
    }

    #[test]
    fn nothing_skips_a_step_or_leaves_rest_except_by_booting() {
        for from in Phase::ALL {
            for to in Phase::ALL {
                if from.is_at_rest() && allowed(from, to) {
                    assert_eq!(to, Booting, "{from} -> {to}");
                }
            }
            assert!(!allowed(from, Creating), "nothing goes back to creating");
        }
        assert!(!allowed(Running, Stopped), "stopping is recorded first");
        assert!(!allowed(Running, Paused), "pausing is recorded as stopping first");
        assert!(!allowed(Creating, Running));
        assert!(!allowed(Stopped, Failed));
    }
}
