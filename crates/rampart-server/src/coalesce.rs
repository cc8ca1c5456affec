//! Many callers, one round trip.
//!
//! A caller that needs "a fresh answer obtained after I arrived" (a follower's read index from
//! the leader) joins the next round instead of starting its own. One driver task runs rounds
//! back to back while callers are waiting; each round answers exactly the callers that were
//! waiting when it started, so every answer is younger than the call it answers. Under load the
//! cost of a round is shared by everyone who arrived during the previous one.

use std::sync::Mutex;

use tokio::sync::oneshot;

pub struct Rounds<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    waiters: Vec<oneshot::Sender<T>>,
    driving: bool,
}

impl<T: Clone> Default for Rounds<T> {
    fn default() -> Self {
        Rounds { state: Mutex::new(State { waiters: Vec::new(), driving: false }) }
    }
}

impl<T: Clone> Rounds<T> {
    /// Waits for the answer of a round that starts after this call. `spawn_driver` is called when
    /// no driver is running; it must spawn a task that loops over [`Rounds::next_round`].
    /// `None`: the driver went away without answering (shutdown).
    pub async fn join(&self, spawn_driver: impl FnOnce()) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().unwrap();
            s.waiters.push(tx);
            !std::mem::replace(&mut s.driving, true)
        };
        if start {
            spawn_driver();
        }
        rx.await.ok()
    }

    /// For the driver: the callers the round about to start answers, or `None` when nobody
    /// waits (the driver must then return; the next caller spawns a new one).
    pub fn next_round(&self) -> Option<Round<T>> {
        let mut s = self.state.lock().unwrap();
        if s.waiters.is_empty() {
            s.driving = false;
            return None;
        }
        Some(Round { waiters: std::mem::take(&mut s.waiters) })
    }
}

/// The callers one round answers.
pub struct Round<T> {
    waiters: Vec<oneshot::Sender<T>>,
}

impl<T: Clone> Round<T> {
    pub fn answer(self, value: T) {
        for w in self.waiters {
            let _ = w.send(value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Every caller gets the answer of a round that started after it joined, and concurrent
    /// callers share rounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_come_from_rounds_started_after_joining() {
        struct Driver {
            rounds: Rounds<u64>,
            started: AtomicU64,
        }
        impl Driver {
            async fn drive(self: Arc<Self>) {
                while let Some(round) = self.rounds.next_round() {
                    let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    round.answer(n);
                }
            }
        }
        let d = Arc::new(Driver { rounds: Rounds::default(), started: AtomicU64::new(0) });
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                let before = d.started.load(Ordering::SeqCst);
                let d2 = d.clone();
                let got = d.rounds.join(move || drop(tokio::spawn(d2.drive()))).await.unwrap();
                assert!(got > before, "answer from round {got}, but round {before} had started before the call");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rounds = d.started.load(Ordering::SeqCst);
        assert!(rounds < 200, "200 concurrent callers took {rounds} rounds; they should share");
        // A later caller still gets answered (the driver restarts).
        let d2 = d.clone();
        assert!(d.rounds.join(move || drop(tokio::spawn(d2.drive()))).await.unwrap() > rounds);
    }
}
