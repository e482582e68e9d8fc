//! A byte budget on one executor: reservations that wait while the budget is spent and give
//! their bytes back when dropped.
//!
//! Owns: a used-bytes counter, its limit and the tasks waiting for room. `!Send`: one budget
//! belongs to one shard (the broker-wide bound is the sum of the shards' budgets, so no core
//! ever waits on another). Invariant: `used <= max` at all times; a reservation larger than
//! `max` is refused at once instead of waiting forever.

use std::cell::Cell;
use std::rc::Rc;

use super::Notify;

/// A bounded pool of bytes.
pub struct Budget {
    max_bytes: u64,
    used_bytes: Cell<u64>,
    released: Notify,
}

/// Bytes held from a [`Budget`]; released on drop.
pub struct Reservation {
    budget: Rc<Budget>,
    bytes: u64,
}

/// A reservation that can never fit (larger than the whole budget).
#[derive(Debug)]
pub struct OverBudget {
    pub wanted_bytes: u64,
    pub max_bytes: u64,
}

impl Budget {
    pub fn new(max_bytes: u64) -> Rc<Self> {
        Rc::new(Self {
            max_bytes,
            used_bytes: Cell::new(0),
            released: Notify::new(),
        })
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.get()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// An empty reservation, to grow later.
    pub fn empty(self: &Rc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Waits until `bytes` fit, then holds them.
    pub async fn reserve(self: &Rc<Self>, bytes: u64) -> Result<Reservation, OverBudget> {
        let mut r = self.empty();
        r.grow(bytes).await?;
        Ok(r)
    }

    fn try_take(&self, bytes: u64) -> bool {
        let used = self.used_bytes.get();
        if used.saturating_add(bytes) <= self.max_bytes {
            self.used_bytes.set(used + bytes);
            true
        } else {
            false
        }
    }

    fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            self.used_bytes
                .set(self.used_bytes.get().saturating_sub(bytes));
            self.released.notify_all();
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds `bytes` if they fit now, without waiting.
    pub fn try_grow(&mut self, bytes: u64) -> bool {
        if self.budget.try_take(bytes) {
            self.bytes += bytes;
            true
        } else {
            false
        }
    }

    /// Gives `bytes` back (at most what is held).
    pub fn shrink(&mut self, bytes: u64) {
        let n = bytes.min(self.bytes);
        self.bytes -= n;
        self.budget.give_back(n);
    }

    /// Adds `bytes` to this reservation, waiting for room (backpressure).
    pub async fn grow(&mut self, bytes: u64) -> Result<(), OverBudget> {
        let b = &self.budget;
        if self.bytes.saturating_add(bytes) > b.max_bytes {
            return Err(OverBudget {
                wanted_bytes: self.bytes.saturating_add(bytes),
                max_bytes: b.max_bytes,
            });
        }
        loop {
            let wait = b.released.wait();
            if b.try_take(bytes) {
                self.bytes += bytes;
                return Ok(());
            }
            wait.await;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_wait_for_room_and_release_on_drop() {
        let out = crate::runtime::block_on(|| {
            Box::pin(async {
                let b = Budget::new(100);
                let a = b.reserve(60).await.expect("fits");
                assert_eq!(b.used_bytes(), 60);
                assert!(b.reserve(101).await.is_err(), "larger than the budget");
                let b2 = b.clone();
                let waiter = glommio::spawn_local(async move {
                    let r = b2.reserve(50).await.expect("fits after release");
                    r.bytes()
                });
                crate::runtime::sleep(std::time::Duration::from_millis(5)).await;
                assert_eq!(b.used_bytes(), 60, "the waiter must not overdraw");
                drop(a);
                let got = waiter.await;
                (got, b.used_bytes())
            })
        })
        .expect("executor");
        assert_eq!(out, (50, 0));
    }
}
