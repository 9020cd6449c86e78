//! Dual token-bucket throttling with burst credits (US9703602B1 family, EBS gp2 semantics).
