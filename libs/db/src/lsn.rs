use std::{fmt, str::FromStr};

/// A PostgreSQL WAL position (`pg_lsn`), written `XXXXXXXX/XXXXXXXX` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// A position no replica reaches: a read at it goes to the primary at
    /// once (no wait). For a write whose position could not be read after
    /// its commit.
    pub const PRIMARY: Lsn = Lsn(u64::MAX);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text is not a WAL position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WAL position (expected hex like 16/B374D848)")]
pub struct LsnParseError;

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or(LsnParseError)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(LsnParseError);
            }
            u32::from_str_radix(p, 16).map_err(|_| LsnParseError)
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders() {
        let a: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(a.to_string(), "16/B374D848");
        assert_eq!(a.0, 0x16_B374_D848);
        assert!("0/1".parse::<Lsn>().unwrap() < "1/0".parse::<Lsn>().unwrap());
        for bad in ["", "16", "16/", "/1", "x/1", "123456789/0", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }
}
