//! SQL constants for the few values a batch sends inside a simple query.
//!
//! A simple query carries several statements in one round trip but takes no parameters, so
//! the values go in as constants. Only numbers and job names do (the stored runs and slot
//! claims to read, a prune's policy): never a record's body, which goes as a parameter of the
//! extended protocol. A name is an escape string constant (`E'…'`, its `\` and `'` doubled),
//! which means the same whatever the server's `standard_conforming_strings`; the connection's
//! encoding is UTF-8 (the client sets it), where no byte of a multi-byte character is a quote
//! or a backslash. A NUL, which a `text` cannot hold, is refused.

use keel_core::StoreError;

/// `ARRAY[1,2]::bigint[]`.
pub(crate) fn ints(values: &[i64]) -> String {
    let items: Vec<String> = values.iter().map(i64::to_string).collect();
    format!("ARRAY[{}]::bigint[]", items.join(","))
}

/// `ARRAY[E'a',E'b']::text[]`.
pub(crate) fn texts<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<String, StoreError> {
    let items = values
        .into_iter()
        .map(text)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("ARRAY[{}]::text[]", items.join(",")))
}

/// `value` as an escape string constant.
pub(crate) fn text(value: &str) -> Result<String, StoreError> {
    if value.contains('\0') {
        return Err(StoreError::Io(format!(
            "{value:?} holds a NUL, which Postgres text cannot"
        )));
    }
    let mut out = String::with_capacity(value.len() + 3);
    out.push_str("E'");
    for c in value.chars() {
        if matches!(c, '\\' | '\'') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_escape_quotes_and_backslashes_and_refuse_nul() {
        assert_eq!(ints(&[]), "ARRAY[]::bigint[]");
        assert_eq!(
            ints(&[1, -2, i64::MAX]),
            format!("ARRAY[1,-2,{}]::bigint[]", i64::MAX)
        );
        assert_eq!(texts([]), Ok("ARRAY[]::text[]".to_owned()));
        assert_eq!(
            texts(["a", "it's", r"back\slash", "é'"]),
            Ok(r"ARRAY[E'a',E'it''s',E'back\\slash',E'é''']::text[]".to_owned())
        );
        assert!(matches!(text("a\0b"), Err(StoreError::Io(_))));
    }

    #[test]
    fn the_server_reads_back_the_text_it_was_given() {
        let Some(db) = crate::common::TestDb::new() else {
            return;
        };
        let mut client = db.client();
        let values = [
            "plain",
            "it's",
            r"back\slash",
            r"\'",
            "'; DROP TABLE x; --",
            "é ✓ 名",
        ];
        for conforming in ["on", "off"] {
            let set = format!("SET standard_conforming_strings = {conforming}");
            client.batch_execute(&set).unwrap_or_else(|e| panic!("{e}"));
            for value in values {
                let query = format!("SELECT {}", text(value).unwrap_or_else(|e| panic!("{e}")));
                let messages = client
                    .simple_query(&query)
                    .unwrap_or_else(|e| panic!("{query}: {e}"));
                let read = messages.iter().find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                });
                assert_eq!(read.as_deref(), Some(value), "{query}");
            }
        }
    }
}
