//! Managed clusters (seed 000): the rules of `podIdentityProfile`.
