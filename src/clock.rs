//! The clock edge: every adapter that stamps a time asks a `Clock`, so a test or the simulator
//! runs on a virtual clock. The pure core never reads one.

use std::cell::Cell;

use chrono::{DateTime, Duration, Utc};

/// Where an adapter gets the current time.
pub trait Clock {
    fn now(&self) -> DateTime<Utc>;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(std::time::SystemTime::now())
    }
}

/// A clock that moves only when told: tests and the simulator.
#[derive(Debug, Clone)]
pub struct ManualClock(Cell<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock(Cell::new(start))
    }

    pub fn advance(&self, by: Duration) {
        self.0.set(self.0.get() + by);
    }

    pub fn set(&self, to: DateTime<Utc>) {
        self.0.set(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.get()
    }
}

impl<C: Clock + ?Sized> Clock for std::rc::Rc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}
