//! The split: which version of a route serves a request.
//!
//! Without a sticky key the choice is random per request. With one it is a hash of (key,
//! candidate label) into [0, 10000): a key keeps its version for a given weight, raising the
//! weight only moves keys from stable to candidate, and each candidate draws its own cohort. The
//! hash is xxh3 with a seed derived from the candidate label, fixed by its spec, so every
//! replica and every release agrees on it.

use http::header::COOKIE;
use http::{HeaderMap, HeaderName};
use rand::Rng;

use super::table::{Route, Target};
use crate::config::StickyKey;

/// Request header that pins a request to one of its route's versions, when the route allows it.
pub static OVERRIDE_HEADER: HeaderName = HeaderName::from_static("x-weir-version");

/// An override header that names a version the route does not serve.
#[derive(Debug, PartialEq, Eq)]
pub struct BadOverride;

/// Seed of the sticky hash for a candidate label.
pub fn cohort_seed(candidate_label: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(candidate_label.as_bytes())
}

/// The bucket in [0, 10000) a sticky key falls in for a given cohort seed.
#[inline]
pub fn sticky_bucket(key: &[u8], seed: u64) -> u16 {
    (xxhash_rust::xxh3::xxh3_64_with_seed(key, seed) % 10_000) as u16
}

/// The request headers routing reads: a hyper `HeaderMap`, or the raw headers the HTTP/1.1 fast
/// path parsed.
pub trait RequestHeaders {
    /// The first value of `name`.
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;
    /// The first `f(value)` that is `Some`, over every value of `name` in order.
    fn find_value<'s, T>(
        &'s self,
        name: &HeaderName,
        f: impl FnMut(&'s [u8]) -> Option<T>,
    ) -> Option<T>;
}

impl RequestHeaders for HeaderMap {
    #[inline]
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn find_value<'s, T>(
        &'s self,
        name: &HeaderName,
        mut f: impl FnMut(&'s [u8]) -> Option<T>,
    ) -> Option<T> {
        self.get_all(name).iter().find_map(|v| f(v.as_bytes()))
    }
}

impl RequestHeaders for [httparse::Header<'_>] {
    #[inline]
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
            .map(|h| h.value)
    }

    fn find_value<'s, T>(
        &'s self,
        name: &HeaderName,
        mut f: impl FnMut(&'s [u8]) -> Option<T>,
    ) -> Option<T> {
        self.iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name.as_str()))
            .find_map(|h| f(h.value))
    }
}

impl Route {
    /// Chooses the version that serves a request with these headers.
    #[inline]
    pub fn choose<H: RequestHeaders + ?Sized>(&self, headers: &H) -> Result<&Target, BadOverride> {
        self.choose_with(headers, None)
    }

    /// Chooses the version, with the value of the route's sticky body field when it has one
    /// (read from the body by the caller).
    #[inline]
    pub fn choose_with<H: RequestHeaders + ?Sized>(
        &self,
        headers: &H,
        field: Option<&[u8]>,
    ) -> Result<&Target, BadOverride> {
        if self.allow_override {
            if let Some(wanted) = headers.first(&OVERRIDE_HEADER) {
                return self.override_target(wanted);
            }
        }
        let Some(candidate) = &self.candidate else {
            return Ok(&self.stable);
        };
        let bucket = match self
            .sticky
            .as_ref()
            .and_then(|s| sticky_key(s, headers, field))
        {
            Some(key) => sticky_bucket(key, self.cohort_seed),
            None if self.weight == 0 => return Ok(&self.stable),
            None if self.weight >= 10_000 => return Ok(candidate),
            None => rand::rng().random_range(0..10_000u16),
        };
        Ok(if bucket < self.weight {
            candidate
        } else {
            &self.stable
        })
    }

    fn override_target(&self, wanted: &[u8]) -> Result<&Target, BadOverride> {
        if wanted == self.stable.version.label.as_bytes() || wanted == b"stable" {
            return Ok(&self.stable);
        }
        match &self.candidate {
            Some(c) if wanted == c.version.label.as_bytes() || wanted == b"candidate" => Ok(c),
            _ => Err(BadOverride),
        }
    }

    /// The versions an override may name, for error messages.
    pub fn override_choices(&self) -> String {
        let mut s = format!("{} (stable)", self.stable.version.label);
        if let Some(c) = &self.candidate {
            s.push_str(&format!(" or {} (candidate)", c.version.label));
        }
        s
    }
}

/// The sticky key of a request, if it carries one.
#[inline]
fn sticky_key<'h, H: RequestHeaders + ?Sized>(
    sticky: &StickyKey,
    headers: &'h H,
    field: Option<&'h [u8]>,
) -> Option<&'h [u8]> {
    match sticky {
        StickyKey::Field(_) => field.filter(|v| !v.is_empty()),
        StickyKey::Header(name) => headers.first(name).filter(|v| !v.is_empty()),
        StickyKey::Cookie(name) => {
            headers.find_value(&COOKIE, |v| cookie_value(v, name.as_bytes()))
        }
    }
}

/// Finds `name=value` in one `Cookie` header (`a=1; b=2`).
fn cookie_value<'h>(header: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let rest = pair.strip_prefix(name)?;
        let value = rest.strip_prefix(b"=")?;
        (!value.is_empty()).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = b"a=1; session=abc; sess=zzz";
        assert_eq!(cookie_value(h, b"session"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(h, b"sess"), Some(&b"zzz"[..]));
        assert_eq!(cookie_value(h, b"ses"), None);
        assert_eq!(cookie_value(b"session=", b"session"), None);
    }

    #[test]
    fn sticky_buckets_are_uniform_and_cohorts_differ_by_candidate() {
        let a = cohort_seed("chat@v2");
        let b = cohort_seed("chat@v3");
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let in_a = |k: &String| sticky_bucket(k.as_bytes(), a) < 1000;
        let in_b = |k: &String| sticky_bucket(k.as_bytes(), b) < 1000;
        let count_a = keys.iter().filter(|k| in_a(k)).count();
        // 10% of 20000 with 5 standard deviations (sqrt(20000*0.1*0.9) ≈ 42).
        assert!((2000 - 212..=2000 + 212).contains(&count_a), "{count_a}");
        let both = keys.iter().filter(|k| in_a(k) && in_b(k)).count();
        // Independent cohorts overlap in about 1% of keys, not 10%.
        assert!(both < 400, "cohorts overlap in {both} keys");
    }

    #[test]
    fn sticky_hash_is_pinned_by_its_spec() {
        // Replicas and releases must agree: these values are xxh3's and must never change.
        assert_eq!(cohort_seed(""), 0x2d06800538d394c2);
        assert_eq!(
            sticky_bucket(b"user-1", 0),
            (xxhash_rust::xxh3::xxh3_64(b"user-1") % 10_000) as u16
        );
    }
}
