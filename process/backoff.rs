//! The wait between retries: doubling from a first wait up to a ceiling, so a peer that is
//! down for long is asked about as often as the ceiling allows and one that blinked is asked
//! again at once. Every retry loop in the tree waits through this.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    /// The next wait.
    next: Duration,
    /// The longest wait.
    max: Duration,
    /// How many waits so far: the failed attempts of the loop that owns it.
    waits: u32,
}

impl Backoff {
    /// Waits `first`, then twice as long each time, never longer than `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
            waits: 0,
        }
    }

    /// Sleeps for the next wait, and doubles it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
        self.waits += 1;
    }

    /// How many times [`Backoff::wait`] ran.
    pub fn waits(&self) -> u32 {
        self.waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wait_doubles_up_to_its_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let mut waited = Vec::new();
        for _ in 0..5 {
            let before = tokio::time::Instant::now();
            backoff.wait().await;
            waited.push(before.elapsed().as_millis());
        }
        assert_eq!(waited, [100, 200, 400, 500, 500]);
        assert_eq!(backoff.waits(), 5);
    }
}
