//! `Current<T>`: a value replaced as a whole while readers keep the one
//! they took, such as the model a node serves, which a switch replaces.

use std::sync::{Arc, PoisonError, RwLock};

pub struct Current<T>(Arc<RwLock<Arc<T>>>);

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The value now; a later `set` does not change what this returned.
    pub fn get(&self) -> Arc<T> {
        // A holder that panicked cannot leave a half-written `Arc`.
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

impl<T> Clone for Current<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Current<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::Current;

    #[test]
    fn a_reader_keeps_what_it_took_and_later_readers_see_the_new_value() {
        let current = Current::new(1);
        let shared = current.clone();
        let taken = current.get();
        shared.set(2);
        assert_eq!((*taken, *current.get()), (1, 2));
    }
}
