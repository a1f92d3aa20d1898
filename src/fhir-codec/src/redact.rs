//! Removes input values from serde error messages, which may quote PHI back at the caller and
//! into logs (``invalid type: string "Jane Doe", expected a boolean``).

/// Replaces every quoted or back-ticked fragment except serde's own vocabulary (field and variant
/// names from the FHIR model) with nothing. Field names are kept because they are the schema,
/// not the data; values are dropped.
pub fn serde_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[start] as char;
        let before = &rest[..start];
        let after_open = &rest[start + 1..];
        let Some(len) = after_open.find(quote) else {
            out.push_str(rest);
            return out;
        };
        let quoted = &after_open[..len];
        out.push_str(before);
        if keeps_quoted(before, quote) {
            out.push(quote);
            out.push_str(quoted);
            out.push(quote);
        } else {
            // Trim the space serde put before the value so the message still reads well.
            if out.ends_with(' ') {
                out.pop();
            }
        }
        rest = &after_open[len + 1..];
    }
    out.push_str(rest);
    out
}

/// Replaces the bare Rust error names fhirbolt passes through (`ParseBoolError`) with words.
pub fn friendly(message: &str) -> String {
    let described = match message.split(':').next().unwrap_or_default().trim() {
        "ParseBoolError" => "an element of type boolean holds something other than true or false",
        "ParseIntError" => "an element of an integer type holds something other than an integer",
        "ParseFloatError" => "an element of type decimal holds something other than a number",
        _ => return message.to_string(),
    };
    described.to_string()
}

/// serde writes schema names in back-ticks after "field", "fields" and "expected one of";
/// values appear after "string", "variant", "value" or as bare quotes.
fn keeps_quoted(before: &str, quote: char) -> bool {
    if quote != '`' {
        return false;
    }
    let before = before.trim_end();
    before.ends_with("unknown field")
        || before.ends_with("missing field")
        || before.ends_with("duplicate field")
        || before.ends_with("expected one of")
        || before.ends_with(',')
        || before.ends_with("expected")
}

#[cfg(test)]
mod tests {
    use super::serde_message;

    #[test]
    fn values_are_dropped_and_field_names_kept() {
        assert_eq!(
            serde_message(r#"invalid type: string "Jane Doe", expected a boolean at line 1"#),
            "invalid type: string, expected a boolean at line 1"
        );
        assert_eq!(
            serde_message("unknown field `nickname`, expected one of `id`, `meta`"),
            "unknown field `nickname`, expected one of `id`, `meta`"
        );
        assert_eq!(
            serde_message("unknown variant `Spaceship`, expected one of `Account`"),
            "unknown variant, expected one of `Account`"
        );
    }
}
