//! Locking shared by every module.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`. A panic while holding one of the runtime's locks leaves plain data behind
/// (queues, tables); carrying on is better than poisoning every later sender.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
