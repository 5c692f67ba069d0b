//! Store suite cases: groups.

#[allow(unused_imports)]
use crate::case;
#[allow(unused_imports)]
use keyless_store::*;

pub const CASES: &[(&str, crate::CaseFn)] = &[];
