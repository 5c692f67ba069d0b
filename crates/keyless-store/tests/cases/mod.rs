//! The cases of the store suite, by area. Add a case: write `async fn name(s: Store)` in the
//! area's file and list it in that file's `CASES`.

use crate::CaseFn;

mod lease;

/// `case!(f)` → `("f", f boxed)`.
#[macro_export]
macro_rules! case {
    ($f:path) => {
        (stringify!($f), (|s| Box::pin($f(s))) as $crate::CaseFn)
    };
}

pub fn all() -> Vec<(&'static str, CaseFn)> {
    [lease::CASES].concat()
}
