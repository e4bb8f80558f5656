//! Cutting text to a byte bound on a character boundary: one place for the stored messages,
//! delivery errors and command output that must fit a limit.

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` if it was cut
/// (the mark comes on top of `max`).
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}…", &text[..floor_char_boundary(text, max)])
}

/// The largest character boundary of `text` at or before byte `at` (its length if `at` is past
/// the end).
pub fn floor_char_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    (0..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// The smallest character boundary of `text` at or after byte `at` (its length if none).
pub fn ceil_char_boundary(text: &str, at: usize) -> usize {
    (at..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_land_on_character_boundaries() {
        let text = "aé€😀"; // 1, 2, 3 and 4 bytes
        assert_eq!(truncate(text, 100), text);
        assert_eq!(truncate(text, 2), "a…");
        assert_eq!(truncate(text, 3), "aé…");
        assert_eq!(floor_char_boundary(text, 5), 3);
        assert_eq!(ceil_char_boundary(text, 4), 6);
        assert_eq!(ceil_char_boundary(text, 99), text.len());
        assert_eq!(floor_char_boundary(text, 99), text.len());
    }
}
