//! Value parsers with range checks, so a bad flag fails with a message that names the range.

/// A probability in `[0, 1)`.
pub fn probability(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in [0, 1)"))
    }
}

/// A fraction in `(0, 1]`.
pub fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in (0, 1]"))
    }
}

/// A fraction in `[0, 1]`.
pub fn unit(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in [0, 1]"))
    }
}

/// A receiver count in `1..=4096`.
pub fn receivers(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if (1..=spindrift_protocol::sim::MAX_RECEIVERS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in 1..=4096"))
    }
}

/// A page count in `1..=2^24`.
pub fn pages(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if (1..=spindrift_protocol::sim::MAX_PAGES).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in 1..=16777216 (2^24)"))
    }
}

/// A non-negative, finite number.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v >= 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be a finite number >= 0"))
    }
}

/// A positive, finite number.
pub fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be a finite number > 0"))
    }
}

/// A link MTU: 1500 or 9000.
pub fn mtu(s: &str) -> Result<usize, String> {
    match s.trim() {
        "1500" => Ok(1500),
        "9000" => Ok(9000),
        other => Err(format!("`{other}` is not a supported MTU: use 1500 or 9000")),
    }
}

/// A datagram size in `1232..=8972`.
pub fn datagram(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    let (lo, hi) = (spindrift_protocol::wire::MIN_DATAGRAM, spindrift_protocol::wire::MAX_DATAGRAM);
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be in {lo}..={hi}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(probability("0"), Ok(0.0));
        assert!(probability("1").expect_err("1 is out of range").contains("[0, 1)"));
        assert!(probability("1.5").is_err());
        assert!(probability("-0.1").is_err());
        assert!(probability("x").expect_err("not a number").contains("not a number"));
        assert!(fraction("0").is_err());
        assert_eq!(fraction("1"), Ok(1.0));
        assert!(receivers("0").is_err());
        assert!(receivers("4097").is_err());
        assert_eq!(receivers("1024"), Ok(1024));
        assert!(pages("0").is_err());
        assert!(pages("16777217").is_err());
        assert_eq!(mtu("9000"), Ok(9000));
        assert!(mtu("1400").is_err());
        assert!(datagram("100").is_err());
        assert!(positive("0").is_err());
        assert!(non_negative("inf").is_err());
    }
}
