//! The cases of the store suite, by area. Add a case: write `async fn name(s: Store)` in the
//! area's file and list it in that file's `CASES`.

use crate::CaseFn;

mod activity;
mod changes;
mod cluster;
mod directory;
mod groups;
mod hosts;
mod identities;
mod lease;
mod meta;
mod tracked;
mod vault;

/// `case!(f)` → `("f", f boxed)`.
#[macro_export]
macro_rules! case {
    ($f:path) => {
        (stringify!($f), (|s| Box::pin($f(s))) as $crate::CaseFn)
    };
}

pub fn all() -> Vec<(&'static str, CaseFn)> {
    [
        lease::CASES,
        meta::CASES,
        groups::CASES,
        identities::CASES,
        hosts::CASES,
        directory::CASES,
        vault::CASES,
        tracked::CASES,
        cluster::CASES,
        activity::CASES,
        changes::CASES,
    ]
    .concat()
}
