//! Walking indexes: collected ids (so the tables can change while they
//! are walked), expiry ranges, and pages bounded by how much they scan.

use redb::{MultimapTable, ReadableMultimapTable, ReadableTable, Table};

use crate::store::{Page, PageRequest, StoreError};

/// Most records one list call examines, so a selective filter over a large
/// store returns a short page (with a token to continue) instead of
/// scanning everything.
pub(super) const MAX_SCAN: usize = 10_000;

/// The values under `key` in a multimap, collected so the tables can be
/// changed while walking them.
pub(super) fn ids(
    table: &MultimapTable<'_, &'static str, &'static str>,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    table
        .get(key)?
        .map(|v| v.map(|g| g.value().to_owned()).map_err(StoreError::from))
        .collect()
}

/// Keys of a range of an expiry index, collected so the table can be
/// changed while walking them.
pub(super) fn expiry_keys(
    table: &Table<'_, (u64, &'static str), ()>,
    up_to_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut keys = Vec::new();
    for entry in table.range::<(u64, &str)>(..(up_to_ms.saturating_add(1), ""))? {
        if keys.len() >= limit {
            break;
        }
        let (k, _) = entry?;
        let (exp, id) = k.value();
        keys.push((exp, id.to_owned()));
    }
    Ok(keys)
}

/// Walks ids in order after `after`, loads each, keeps those `keep` accepts,
/// and stops at `limit` results or `max_scan` examined (then `next` is the
/// last examined id, so the caller can go on).
pub(super) fn page_of<T>(
    ids: impl Iterator<Item = Result<String, StoreError>>,
    page: &PageRequest,
    max_scan: usize,
    mut load: impl FnMut(&str) -> Result<Option<T>, StoreError>,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>, StoreError> {
    let limit = page.limit.max(1);
    let mut items = Vec::new();
    let mut last = None;
    let mut scanned = 0;
    for id in ids {
        let id = id?;
        if page.after.as_deref().is_some_and(|a| id.as_str() <= a) {
            continue;
        }
        if scanned == max_scan {
            // Stopped by the scan bound: more may follow.
            return Ok(Page { items, next: last });
        }
        scanned += 1;
        if let Some(item) = load(&id)?
            && keep(&item)
        {
            items.push(item);
        }
        last = Some(id);
        if items.len() >= limit {
            return Ok(Page { items, next: last });
        }
    }
    Ok(Page { items, next: None })
}

pub(super) fn multimap_ids(
    table: &redb::ReadOnlyMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<Vec<Result<String, StoreError>>, StoreError> {
    Ok(table
        .get(key)?
        .map(|v| v.map(|g| g.value().to_owned()).map_err(StoreError::from))
        .collect())
}

pub(super) fn table_ids(
    table: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
    after: Option<&str>,
) -> Result<Vec<Result<String, StoreError>>, StoreError> {
    use std::ops::Bound;
    let range = match after {
        Some(a) => table.range::<&str>((Bound::Excluded(a), Bound::Unbounded))?,
        None => table.range::<&str>(..)?,
    };
    Ok(range
        .take(MAX_SCAN + 1)
        .map(|e| {
            e.map(|(k, _)| k.value().to_owned())
                .map_err(StoreError::from)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages over 0..n with a scan bound of 3 and a filter that keeps only
    /// multiples of 4, collecting everything.
    fn walk(n: usize, limit: usize) -> (Vec<usize>, usize) {
        let ids: Vec<String> = (0..n).map(|i| format!("{i:04}")).collect();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            // As `table_ids` does: the source starts after `after`.
            let source = ids
                .iter()
                .filter(|id| after.as_deref().is_none_or(|a| id.as_str() > a))
                .take(3 + 1)
                .map(|id| Ok(id.clone()));
            let page = PageRequest {
                after: after.clone(),
                limit,
            };
            let got = page_of(
                source,
                &page,
                3,
                |id| Ok(Some(id.parse::<usize>().unwrap())),
                |v| v % 4 == 0,
            )
            .unwrap();
            out.extend(got.items);
            match got.next {
                Some(n) => after = Some(n),
                None => return (out, pages),
            }
        }
    }

    #[test]
    fn scan_bounded_pages_skip_nothing() {
        let (got, pages) = walk(50, 100);
        assert_eq!(got, (0..50).filter(|v| v % 4 == 0).collect::<Vec<_>>());
        assert!(pages > 10, "the scan bound split the walk into many pages");
        let (got, _) = walk(50, 1);
        assert_eq!(got.len(), 13);
    }
}
