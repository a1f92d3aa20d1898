//! FHIR R4 knowledge the server needs at the edge: wire formats, strict parsing of incoming
//! resources, the rules fhirbolt does not check (primitive formats, required bindings), the patient
//! compartment, Bundles and the CapabilityStatement.

pub mod bundle;
pub mod capability;
pub mod compartment;
pub mod format;
pub mod parse;
pub mod validate;

/// Whether `id` is a valid FHIR resource id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_follow_the_r4_id_rule() {
        assert!(super::is_valid_id("a-1.B"));
        assert!(!super::is_valid_id(""));
        assert!(!super::is_valid_id("a/b"));
        assert!(!super::is_valid_id("x'; DROP TABLE"));
        assert!(!super::is_valid_id(&"a".repeat(65)));
    }
}
