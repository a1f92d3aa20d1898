//! Turns the line and column of a serde_json error into the element path the client wrote there,
//! so an OperationOutcome can say *where* (`Patient.name[0].nickname`), not just "line 1 column 57".
//!
//! A small scanner walks the JSON text up to the error position keeping a stack of objects (with
//! the key being read) and arrays (with the index). It trusts nothing: on any surprise it stops and
//! reports what it has.

enum Frame {
    Object {
        key: Option<String>,
        seen: Vec<String>,
    },
    Array {
        index: usize,
    },
}

/// The FHIRPath-like location (`Type.element[index].child`) at `line`/`column` (1-based, as
/// serde_json counts them) of a JSON resource, or `None` if the position is outside any element.
pub fn json_path_at(bytes: &[u8], line: usize, column: usize) -> Option<String> {
    let end = byte_offset(bytes, line, column)?.min(bytes.len());
    let (stack, root_type) = scan(bytes, end, |_, _| false);
    render(&root_type, &stack)
}

/// The location of the first object key named `key` whose earlier sibling keys are all among
/// `allowed` (the element names fhirbolt listed as expected where it met the unknown one). Used
/// when fhirbolt reports an unknown element without a position.
pub fn json_path_of_unknown_key(bytes: &[u8], key: &str, allowed: &[&str]) -> Option<String> {
    let mut found = false;
    let (stack, root_type) = scan(bytes, bytes.len(), |name, siblings| {
        found = name == key
            && siblings
                .iter()
                .all(|sibling| sibling.starts_with('_') || allowed.contains(&sibling.as_str()));
        found
    });
    found.then(|| render(&root_type, &stack)).flatten()
}

/// Walks the text up to `end`, calling `on_key(key, earlier_sibling_keys)` for each object key;
/// stops early when it returns true. Returns the open containers and the root resource type.
fn scan(
    bytes: &[u8],
    end: usize,
    mut on_key: impl FnMut(&str, &[String]) -> bool,
) -> (Vec<Frame>, String) {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root_type: Option<String> = None;
    let mut position = 0;
    while position < end {
        match bytes[position] {
            b'{' => stack.push(Frame::Object {
                key: None,
                seen: Vec::new(),
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, seen }) => {
                    if let Some(done) = key.take() {
                        seen.push(done);
                    }
                }
                None => {}
            },
            b'"' => {
                let Some((text, next)) = read_string(bytes, position) else {
                    break;
                };
                let is_key = matches!(stack.last(), Some(Frame::Object { key: None, .. }))
                    && next_significant(bytes, next) == Some(b':');
                if is_key {
                    let stop = match stack.last() {
                        Some(Frame::Object { seen, .. }) => on_key(&text, seen),
                        _ => false,
                    };
                    if let Some(Frame::Object { key, .. }) = stack.last_mut() {
                        *key = Some(text);
                    }
                    if stop {
                        break;
                    }
                } else if stack.len() == 1 && root_type.is_none() {
                    if let Some(Frame::Object { key: Some(key), .. }) = stack.last() {
                        if key == "resourceType" {
                            root_type = Some(text);
                        }
                    }
                }
                position = next;
                continue;
            }
            _ => {}
        }
        position += 1;
    }
    (stack, root_type.unwrap_or_else(|| "Resource".to_string()))
}

fn render(root: &str, stack: &[Frame]) -> Option<String> {
    let mut path = root.to_string();
    let mut any = false;
    for frame in stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                path.push('.');
                path.push_str(key);
                any = true;
            }
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => {
                path.push_str(&format!("[{index}]"));
                any = true;
            }
        }
    }
    any.then_some(path)
}

/// Reads a JSON string starting at the opening quote; returns its (unescaped enough) text and
/// the offset just past the closing quote.
fn read_string(bytes: &[u8], start: usize) -> Option<(String, usize)> {
    let mut position = start + 1;
    let mut text = Vec::new();
    while position < bytes.len() {
        match bytes[position] {
            b'"' => return Some((String::from_utf8_lossy(&text).into_owned(), position + 1)),
            b'\\' => {
                text.push(*bytes.get(position + 1)?);
                position += 2;
            }
            byte => {
                text.push(byte);
                position += 1;
            }
        }
    }
    // Unterminated string: the error is inside it; report the enclosing element.
    Some((String::from_utf8_lossy(&text).into_owned(), bytes.len()))
}

fn next_significant(bytes: &[u8], from: usize) -> Option<u8> {
    bytes[from.min(bytes.len())..]
        .iter()
        .copied()
        .find(|byte| !byte.is_ascii_whitespace())
}

fn byte_offset(bytes: &[u8], line: usize, column: usize) -> Option<usize> {
    let mut current_line = 1;
    let mut line_start = 0;
    if line > 1 {
        for (offset, byte) in bytes.iter().enumerate() {
            if *byte == b'\n' {
                current_line += 1;
                if current_line == line {
                    line_start = offset + 1;
                    break;
                }
            }
        }
        if current_line != line {
            return None;
        }
    }
    Some(line_start + column)
}

#[cfg(test)]
mod tests {
    use super::json_path_at;

    #[test]
    fn finds_nested_keys_and_indices_across_lines() {
        let text = "{\n \"resourceType\": \"Observation\",\n \"component\": [{}, {\"code\": {\"codingX\": 1}}]\n}";
        let line = 3;
        let column = text.lines().nth(2).unwrap().find("codingX").unwrap() + "codingX\"".len();
        assert_eq!(
            json_path_at(text.as_bytes(), line, column).as_deref(),
            Some("Observation.component[1].code.codingX")
        );
    }

    #[test]
    fn unknown_key_is_found_where_its_siblings_are_known() {
        let text = br#"{"resourceType":"Patient","text":{"div":"x"},"name":[{"family":"D","text":"x","nickname":"y"}]}"#;
        assert_eq!(
            super::json_path_of_unknown_key(text, "nickname", &["family", "text"]).as_deref(),
            Some("Patient.name[0].nickname")
        );
        assert_eq!(super::json_path_of_unknown_key(text, "absent", &[]), None);
    }

    #[test]
    fn outside_any_element_is_none() {
        assert_eq!(json_path_at(b"{}", 1, 1), None);
        assert_eq!(json_path_at(b"{}", 9, 1), None);
    }
}
