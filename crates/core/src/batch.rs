//! Planning a batch of writes, for backends that implement
//! [`Store::put_many`](crate::Store::put_many) natively: which writes may
//! go together, and in pieces of what size.

use std::collections::HashMap;

use crate::error::{Error, Operation, Result};
use crate::id::{DocName, RunId};
use crate::store::PutRequest;

/// The writes `indices` (into `puts`, in order) in waves: the `n`-th write
/// of each document in wave `n`, in input order within a wave. Writes of
/// different documents do not depend on each other; those of one document
/// must run in order, each seeing the earlier one's outcome, so a wave
/// never holds two writes of one document.
pub fn waves(puts: &[PutRequest], indices: impl IntoIterator<Item = usize>) -> Vec<Vec<usize>> {
    let mut seen: HashMap<&DocName, usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for i in indices {
        let n = seen.entry(&puts[i].doc).or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(i);
        *n += 1;
    }
    waves
}

/// Splits `wave` (indices into `puts`) into consecutive groups of at most
/// `max_items` writes and `max_bytes` bytes of documents; a document larger
/// than `max_bytes` goes alone.
pub fn groups<'w>(
    puts: &[PutRequest],
    wave: &'w [usize],
    max_items: usize,
    max_bytes: u64,
) -> Vec<&'w [usize]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (k, &i) in wave.iter().enumerate() {
        let size = puts[i].bytes.len() as u64;
        if k > start && (k - start >= max_items || bytes + size > max_bytes) {
            groups.push(&wave[start..k]);
            (start, bytes) = (k, 0);
        }
        bytes += size;
    }
    if start < wave.len() {
        groups.push(&wave[start..]);
    }
    groups
}

/// The results of a batch whose pieces filled `outcomes` (one slot per
/// request, in request order, `docs` naming each request's document): each
/// error placed at its document with `operation` and `run`, and a slot no
/// piece filled (a backend bug) reported as `missing()` rather than a panic.
pub fn settle<'d, T>(
    outcomes: Vec<Option<Result<T>>>,
    docs: impl IntoIterator<Item = &'d DocName>,
    operation: Operation,
    run: &RunId,
    missing: impl Fn() -> Error,
) -> Vec<Result<T>> {
    outcomes
        .into_iter()
        .zip(docs)
        .map(|(outcome, doc)| {
            outcome
                .unwrap_or_else(|| Err(missing()))
                .map_err(|e| e.at_doc(operation, run, doc))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bytes, PutMode};

    fn put(doc: &str, size: usize) -> PutRequest {
        PutRequest::new(
            DocName::new(doc).expect("valid"),
            Bytes::from(vec![0u8; size]),
            PutMode::Overwrite,
        )
    }

    #[test]
    fn writes_of_one_document_go_in_waves() {
        let puts = [
            put("a", 1),
            put("b", 1),
            put("a", 1),
            put("c", 1),
            put("a", 1),
        ];
        assert_eq!(
            waves(&puts, 0..puts.len()),
            vec![vec![0, 1, 3], vec![2], vec![4]]
        );
        assert_eq!(waves(&puts, [1, 2, 4]), vec![vec![1, 2], vec![4]]);
        assert!(waves(&[], 0..0).is_empty());
    }

    #[test]
    fn groups_are_bounded_by_count_and_bytes() {
        const ITEMS: usize = 256;
        const BYTES: usize = 1 << 20;
        let many: Vec<PutRequest> = (0..ITEMS + 1).map(|i| put(&format!("d{i}"), 1)).collect();
        let wave: Vec<usize> = (0..many.len()).collect();
        let sizes: Vec<usize> = groups(&many, &wave, ITEMS, BYTES as u64)
            .iter()
            .map(|g| g.len())
            .collect();
        assert_eq!(sizes, vec![ITEMS, 1]);
        let big = [
            put("a", BYTES / 2),
            put("b", BYTES / 2),
            put("c", 1),
            put("d", BYTES * 2),
            put("e", 1),
        ];
        let wave: Vec<usize> = (0..big.len()).collect();
        let split: Vec<Vec<usize>> = groups(&big, &wave, ITEMS, BYTES as u64)
            .iter()
            .map(|g| g.to_vec())
            .collect();
        assert_eq!(split, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
    }
}
