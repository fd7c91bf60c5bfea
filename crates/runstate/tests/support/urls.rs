//! URL helpers for the tests, needing no backend feature (the conformance
//! tests of compositions take this file alone).

/// `url` with the query option `option` (`name=value`) added.
pub fn with_option(url: &str, option: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{option}")
}

/// `url` encoded as one query value (the URL of a `locks=` or `cache=`
/// option).
pub fn encode(url: &str) -> String {
    url::form_urlencoded::byte_serialize(url.as_bytes()).collect()
}
