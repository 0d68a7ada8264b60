//! A simulated master for in-process tests of the link (`core::link`): records every message,
//! can be "down", acknowledges reports as a real master would (up to the last sequence number it
//! got), and answers `register` with what a test sets.
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::api::master::{Heartbeat, ProjectStates, Register, RegisterAnswer, ReportAnswer};
use crate::core::link::Trust;
use crate::domain::master::Report;
use crate::ports::{Master, MasterError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the simulated master got.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// `register` messages
    pub registers: Vec<Register>,
    /// `heartbeat` messages
    pub heartbeats: Vec<Heartbeat>,
    /// every report, in the order received (re-sent ones again)
    pub reports: Vec<Report>,
}

/// The simulated master.
#[derive(Debug, Default)]
pub struct SimMaster {
    down: Mutex<bool>,
    answer: Mutex<RegisterAnswer>,
    got: Mutex<Received>,
}

impl SimMaster {
    /// A master that is up and answers `register` with nothing.
    pub fn new() -> Arc<SimMaster> {
        Arc::default()
    }
    /// Makes every call fail (unreachable) or succeed again.
    pub fn set_down(&self, down: bool) {
        *lock(&self.down) = down;
    }
    /// What the next `register` is answered with.
    pub fn set_answer(&self, a: RegisterAnswer) {
        *lock(&self.answer) = a;
    }
    /// What it got so far.
    pub fn received(&self) -> Received {
        lock(&self.got).clone()
    }
    /// The distinct reports by sequence number (as a master dedups them), in order.
    pub fn deduped(&self) -> Vec<Report> {
        let mut v = lock(&self.got).reports.clone();
        v.sort_by_key(|r| r.seq);
        v.dedup_by_key(|r| r.seq);
        v
    }
    fn check(&self) -> Result<(), MasterError> {
        if *lock(&self.down) {
            Err(MasterError::Unreachable(
                "connect: connection refused".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Master for SimMaster {
    async fn register(&self, msg: &Register) -> Result<RegisterAnswer, MasterError> {
        self.check()?;
        lock(&self.got).registers.push(msg.clone());
        Ok(lock(&self.answer).clone())
    }
    async fn heartbeat(&self, msg: &Heartbeat) -> Result<(), MasterError> {
        self.check()?;
        lock(&self.got).heartbeats.push(msg.clone());
        Ok(())
    }
    async fn report(&self, msg: &ProjectStates) -> Result<ReportAnswer, MasterError> {
        self.check()?;
        let mut got = lock(&self.got);
        got.reports.extend(msg.reports.iter().cloned());
        Ok(ReportAnswer {
            acked: msg.reports.last().map_or(0, |r| r.seq),
        })
    }
}

/// A trust that records what the master's answers asked for.
#[derive(Debug, Default)]
pub struct SimTrust {
    /// the answers applied
    pub applied: Mutex<Vec<RegisterAnswer>>,
}

#[async_trait]
impl Trust for SimTrust {
    fn public_keys(&self) -> Vec<String> {
        vec!["sim-key".into()]
    }
    async fn apply(&self, answer: &RegisterAnswer) -> Result<(), String> {
        lock(&self.applied).push(answer.clone());
        Ok(())
    }
}
