//! Reading documents: one, several (a statement per chunk of names), or
//! one unless its version is already known.

use std::collections::{HashMap, HashSet};

use runstate_core::{
    Bytes, DocName, Error, ErrorKind, Fetched, GetOptions, Operation, Result, RunId, StoredDoc,
    Version,
};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::errors::map_error;
use crate::statements;
use crate::{Inner, P};

impl Inner {
    fn too_large(&self, size: i64, limit: Option<u64>) -> Error {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "document is {size} bytes, over the limit of {}",
                limit.unwrap_or(0)
            ),
        )
        .with_backend(self.backend())
    }

    /// A document from columns version, size, bytes-or-NULL at `at`.
    pub(crate) fn stored_at(
        &self,
        row: &AnyRow,
        at: usize,
        limit: Option<u64>,
    ) -> Result<Option<StoredDoc>> {
        let Some(version) = self.get_opt_i64(row, at)? else {
            return Ok(None);
        };
        let size = self.get_i64(row, at + 1)?;
        let bytes: Option<Vec<u8>> = row
            .try_get(at + 2)
            .map_err(|e| map_error(self.dialect, e))?;
        match bytes {
            Some(bytes) => Ok(Some(StoredDoc::new(
                Bytes::from(bytes),
                Version::new(version.to_string()),
            ))),
            None => Err(self.too_large(size, limit)),
        }
    }

    pub(crate) fn limit(options: GetOptions) -> i64 {
        options
            .limit
            .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
    }

    /// Reads `doc` unless its version is `known`: the version column is
    /// compared in the database, which sends the bytes only when it
    /// differs (and the size allows).
    pub(crate) async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        // Only a version this backend made can match (it prints as it was
        // parsed); anything else is compared as 0, which no version is.
        let known = known
            .as_str()
            .parse::<i64>()
            .ok()
            .filter(|v| v.to_string() == known.as_str())
            .unwrap_or(0);
        let row = self
            .fetch_optional(
                &self.sql.get_if_changed,
                &[
                    P::T(run.as_str()),
                    P::T(doc.as_str()),
                    P::I(known),
                    P::I(Self::limit(options)),
                ],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Fetched::Absent);
        };
        if self.get_i64(&row, 0)? == known {
            return Ok(Fetched::Unchanged);
        }
        match self.stored_at(&row, 0, options.limit)? {
            Some(stored) => Ok(Fetched::Changed(stored)),
            None => Ok(Fetched::Absent),
        }
    }

    pub(crate) async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        if options.limit.is_none() {
            let row = self
                .fetch_optional(
                    &self.sql.get_unlimited,
                    &[P::T(run.as_str()), P::T(doc.as_str())],
                )
                .await?;
            return row
                .map(|row| {
                    Ok(StoredDoc::new(
                        Bytes::from(
                            row.try_get::<Vec<u8>, _>(1)
                                .map_err(|e| map_error(self.dialect, e))?,
                        ),
                        Version::new(self.get_i64(&row, 0)?.to_string()),
                    ))
                })
                .transpose();
        }
        let row = self
            .fetch_optional(
                &self.sql.get,
                &[
                    P::T(run.as_str()),
                    P::T(doc.as_str()),
                    P::I(Self::limit(options)),
                ],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => self.stored_at(&row, 0, options.limit),
        }
    }

    /// Reads several documents of `run` (see [`Store::get_many`](runstate_core::Store::get_many)): one
    /// statement per `2^GET_MANY_LOG2` distinct names, the size limit
    /// applied per row as [`Inner::get`] applies it.
    pub(crate) async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let limit = Self::limit(options);
        let mut seen = HashSet::new();
        let distinct: Vec<&DocName> = docs.iter().filter(|d| seen.insert(*d)).collect();
        // A document over the limit is kept as its size, so each request
        // for it gets its own error.
        let mut found: HashMap<String, std::result::Result<StoredDoc, i64>> = HashMap::new();
        for chunk in distinct.chunks(1 << statements::GET_MANY_LOG2) {
            let (stmt, slots) = self.sql.get_many(chunk.len());
            let mut params = Vec::with_capacity(slots + 2);
            params.push(P::T(run.as_str()));
            params.push(P::I(limit));
            // The list is padded by repeating the last name.
            params.extend((0..slots).map(|i| P::T(chunk[i.min(chunk.len() - 1)].as_str())));
            for row in self.fetch_all(stmt, &params).await? {
                let name = self.get_text(&row, 0)?;
                let entry = match self.stored_at(&row, 1, options.limit) {
                    Ok(Some(stored)) => Ok(stored),
                    Ok(None) => continue,
                    Err(error) if error.kind() == ErrorKind::TooLarge => {
                        Err(self.get_i64(&row, 2)?)
                    }
                    Err(error) => return Err(error),
                };
                found.insert(name, entry);
            }
        }
        Ok(docs
            .iter()
            .map(|doc| match found.get(doc.as_str()) {
                None => Ok(None),
                Some(Ok(stored)) => Ok(Some(stored.clone())),
                Some(Err(size)) => {
                    Err(self
                        .too_large(*size, options.limit)
                        .at_doc(Operation::Get, run, doc))
                }
            })
            .collect())
    }
}
