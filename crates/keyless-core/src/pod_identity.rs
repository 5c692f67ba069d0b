//! Pod identity through NMI (seed 000): which identities a pod may use.
