//! QoS configuration of volumes and nodes, its validation, and the node capacity check.

use serde::{Deserialize, Serialize};

/// The QoS of one volume. `None` is unlimited; the default is fully unlimited.
///
/// ```
/// use common::throttle::{QosConfig, QosError};
/// let gp2_like = QosConfig { iops: Some(300), burst_iops: Some(3_000), burst_credits: 5_400_000, bandwidth: Some(128 << 20) };
/// assert!(gp2_like.validate().is_ok());
/// let bad = QosConfig { burst_iops: Some(100), ..gp2_like };
/// assert_eq!(bad.validate(), Err(QosError::BurstBelowBaseline { iops: 300, burst_iops: 100 }));
/// assert!(QosConfig::UNLIMITED.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QosConfig {
    /// Baseline B in ops per second (`--iops`): the work bucket's refill rate; it holds one
    /// second of it.
    pub iops: Option<u64>,
    /// Burst ceiling P in ops per second (`--burst-iops`), at least `iops`. `None` with burst
    /// credits: credits are spent as fast as the volume asks.
    pub burst_iops: Option<u64>,
    /// Maximum (and initial) burst credit balance in ops (`--burst-credits`); 0 disables bursting.
    pub burst_credits: u64,
    /// Bandwidth in bytes per second (`--bandwidth`); the bytes bucket holds one second of it.
    pub bandwidth: Option<u64>,
}

impl QosConfig {
    /// No limit at all.
    pub const UNLIMITED: QosConfig = QosConfig {
        iops: None,
        burst_iops: None,
        burst_credits: 0,
        bandwidth: None,
    };

    /// Checks the configuration; every constructor and `set_config` call this.
    pub fn validate(&self) -> Result<(), QosError> {
        nonzero("iops", self.iops)?;
        nonzero("burst_iops", self.burst_iops)?;
        nonzero("bandwidth", self.bandwidth)?;
        match (self.iops, self.burst_iops) {
            (None, Some(_)) => Err(QosError::BurstWithoutBaseline),
            (None, None) if self.burst_credits > 0 => Err(QosError::BurstWithoutBaseline),
            (Some(iops), Some(burst_iops)) if burst_iops < iops => {
                Err(QosError::BurstBelowBaseline { iops, burst_iops })
            }
            _ => Ok(()),
        }
    }
}

/// The throttling configuration of one head node.
///
/// ```
/// use common::throttle::{Discount, GlobalConfig, QosError};
/// let node = GlobalConfig { capacity_iops: Some(50_000), spare_capacity_discount: Some(Discount::new(0.5)?) };
/// assert!(node.validate().is_ok());
/// let no_capacity = GlobalConfig { capacity_iops: None, ..node };
/// assert_eq!(no_capacity.validate(), Err(QosError::DiscountWithoutCapacity));
/// # Ok::<(), QosError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalConfig {
    /// The node's capacity in ops per second: the global bucket's refill rate. `None`: unlimited.
    pub capacity_iops: Option<u64>,
    /// While the global bucket shows spare capacity, above-baseline I/O is charged to the
    /// volume's burst credits at this factor. `None` (the default): no discount, exact limits.
    pub spare_capacity_discount: Option<Discount>,
}

impl GlobalConfig {
    /// No node limit, no discount.
    pub const UNLIMITED: GlobalConfig = GlobalConfig {
        capacity_iops: None,
        spare_capacity_discount: None,
    };

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), QosError> {
        nonzero("capacity_iops", self.capacity_iops)?;
        if self.spare_capacity_discount.is_some() && self.capacity_iops.is_none() {
            return Err(QosError::DiscountWithoutCapacity);
        }
        Ok(())
    }
}

fn nonzero(field: &'static str, v: Option<u64>) -> Result<(), QosError> {
    match v {
        Some(0) => Err(QosError::ZeroRate(field)),
        _ => Ok(()),
    }
}

/// A discount factor in (0, 1], held exactly in parts per million. It reads and writes as a
/// float in configuration files.
///
/// ```
/// use common::throttle::Discount;
/// let d = Discount::new(0.25).unwrap();
/// assert_eq!(d.ppm(), 250_000);
/// assert_eq!(d.factor(), 0.25);
/// assert!(Discount::new(0.0).is_err());
/// assert!(Discount::new(1.5).is_err());
/// assert!(Discount::new(f64::NAN).is_err());
/// assert!(Discount::from_ppm(1_000_001).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Discount {
    ppm: u32,
}

impl Discount {
    /// Parts per million in 1.0.
    pub const ONE_PPM: u32 = 1_000_000;

    /// No discount (factor 1).
    pub const NONE: Discount = Discount { ppm: Self::ONE_PPM };

    /// From a factor in (0, 1], rounded to the nearest millionth (which must not be 0).
    pub fn new(factor: f64) -> Result<Self, QosError> {
        if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
            return Err(QosError::InvalidDiscount(factor));
        }
        let ppm = (factor * f64::from(Self::ONE_PPM)).round() as u32;
        Self::from_ppm(ppm).map_err(|_| QosError::InvalidDiscount(factor))
    }

    /// From parts per million, in 1..=1_000_000.
    pub fn from_ppm(ppm: u32) -> Result<Self, QosError> {
        if ppm == 0 || ppm > Self::ONE_PPM {
            return Err(QosError::InvalidDiscount(
                f64::from(ppm) / f64::from(Self::ONE_PPM),
            ));
        }
        Ok(Discount { ppm })
    }

    /// The factor in parts per million.
    pub const fn ppm(self) -> u32 {
        self.ppm
    }

    /// The factor.
    pub fn factor(self) -> f64 {
        f64::from(self.ppm) / f64::from(Self::ONE_PPM)
    }
}

impl TryFrom<f64> for Discount {
    type Error = QosError;
    fn try_from(factor: f64) -> Result<Self, QosError> {
        Discount::new(factor)
    }
}

impl From<Discount> for f64 {
    fn from(d: Discount) -> f64 {
        d.factor()
    }
}

/// An invalid QoS configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QosError {
    /// A rate of zero.
    #[error("{0} must be at least 1; leave it unset for unlimited")]
    ZeroRate(&'static str),
    /// The burst ceiling is below the baseline.
    #[error(
        "burst_iops ({burst_iops}) is below iops ({iops}): the burst ceiling must be at least the baseline"
    )]
    BurstBelowBaseline {
        /// The baseline.
        iops: u64,
        /// The ceiling.
        burst_iops: u64,
    },
    /// Burst settings on a volume without a baseline.
    #[error(
        "burst_iops and burst_credits need a baseline: set iops too (without it the volume is unlimited)"
    )]
    BurstWithoutBaseline,
    /// A discount factor outside (0, 1].
    #[error("spare_capacity_discount {0} must be a factor in (0, 1], at least 0.000001")]
    InvalidDiscount(f64),
    /// A discount on a node without a capacity to measure spare capacity against.
    #[error(
        "spare_capacity_discount needs capacity_iops: spare capacity is measured against the node's capacity"
    )]
    DiscountWithoutCapacity,
}

/// The node cannot lead one more volume at its baseline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// The baselines add up to more than the node's capacity.
    #[error(
        "the volumes' baselines add up to {demand} IOPS, above the node's capacity of {capacity} IOPS"
    )]
    Exceeded {
        /// Sum of the baselines.
        demand: u128,
        /// The node's capacity.
        capacity: u64,
    },
    /// A volume without a baseline (unlimited) on a node with a finite capacity.
    #[error(
        "a volume with unlimited IOPS cannot be guaranteed its baseline on a node with a capacity of {capacity} IOPS"
    )]
    UnlimitedVolume {
        /// The node's capacity.
        capacity: u64,
    },
}

/// Checks that the sum of the baselines of `volumes` (the volumes a node leads, including the
/// one being created or placed) fits in the node's `capacity_iops`, so every volume can always
/// get its baseline. Returns the remaining headroom in IOPS (`None` on an unlimited node).
///
/// A volume with an unlimited baseline does not fit on a node with a finite capacity.
///
/// ```
/// use common::throttle::{CapacityError, QosConfig, check_capacity};
/// let v = |iops| QosConfig { iops: Some(iops), ..QosConfig::UNLIMITED };
/// assert_eq!(check_capacity(Some(1_000), &[v(300), v(700)]), Ok(Some(0)));
/// assert_eq!(
///     check_capacity(Some(1_000), &[v(300), v(701)]),
///     Err(CapacityError::Exceeded { demand: 1_001, capacity: 1_000 })
/// );
/// assert_eq!(check_capacity(None, &[QosConfig::UNLIMITED]), Ok(None));
/// ```
pub fn check_capacity<'a>(
    capacity_iops: Option<u64>,
    volumes: impl IntoIterator<Item = &'a QosConfig>,
) -> Result<Option<u64>, CapacityError> {
    let Some(capacity) = capacity_iops else {
        return Ok(None);
    };
    let mut demand: u128 = 0;
    for v in volumes {
        match v.iops {
            None => return Err(CapacityError::UnlimitedVolume { capacity }),
            Some(b) => demand = demand.saturating_add(u128::from(b)),
        }
    }
    match u128::from(capacity).checked_sub(demand) {
        Some(headroom) => Ok(Some(headroom as u64)),
        None => Err(CapacityError::Exceeded { demand, capacity }),
    }
}
