//! Who is calling: the claims of a validated access token, as the access decision reads them.

use super::scopes::Scopes;

/// A literal reference such as `Practitioner/123`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FhirUser {
    pub resource_type: String,
    pub id: String,
}

impl FhirUser {
    /// Reads `Practitioner/123` or an absolute URL ending in it.
    pub fn parse(reference: &str) -> Option<FhirUser> {
        let mut segments = reference.trim_end_matches('/').rsplit('/');
        let id = segments.next()?;
        let resource_type = segments.next()?;
        let known = matches!(
            resource_type,
            "Practitioner" | "PractitionerRole" | "Patient" | "RelatedPerson" | "Person" | "Device"
        );
        (known && crate::fhir::is_valid_id(id)).then(|| FhirUser {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
        })
    }
}

/// The authenticated caller. Built only from a token whose signature, issuer, audience and
/// lifetime were checked. Serializable so that background work done for a caller (a Bulk Data
/// export) is decided with the caller's own claims; the token itself is never kept.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    /// `sub`.
    pub subject: String,
    /// `client_id` (or `azp`).
    pub client_id: Option<String>,
    /// The issuer that signed the token.
    pub issuer: String,
    /// `fhirUser`.
    pub fhir_user: Option<FhirUser>,
    /// Roles from the configured roles claim.
    pub roles: Vec<String>,
    /// SMART scopes.
    pub scopes: Scopes,
    /// The launch patient (`patient` claim).
    pub patient: Option<String>,
    /// `tenant`, when the issuer states one.
    pub tenant: Option<String>,
    /// `purpose_of_use`, e.g. `TREAT` or `ETREAT`.
    pub purpose_of_use: Option<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
    /// A break-the-glass declaration in force for this request (`X-Break-Glass` with a reason,
    /// by a role the policy lets override, within the token's time box); never from the token,
    /// and never stored: an emergency does not extend into background work.
    #[serde(skip)]
    pub emergency: Option<Emergency>,
}

/// An emergency override in force for one request (see `consent::break_glass`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emergency {
    /// The break-the-glass session the request belongs to.
    pub session_id: String,
    /// When the session's time box closes, microseconds since the epoch.
    pub expires_us: i64,
}

impl Principal {
    /// Whether the caller holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|held| held == role)
    }

    /// The patient this caller is confined to as a patient: the launch patient, or the
    /// Patient named by `fhirUser`.
    pub fn own_patient(&self) -> Option<&str> {
        self.patient.as_deref().or(self
            .fhir_user
            .as_ref()
            .filter(|user| user.resource_type == "Patient")
            .map(|user| user.id.as_str()))
    }

    /// The Practitioner id of a practitioner caller.
    pub fn practitioner_id(&self) -> Option<&str> {
        self.fhir_user
            .as_ref()
            .filter(|user| user.resource_type == "Practitioner")
            .map(|user| user.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FhirUser;

    #[test]
    fn fhir_user_accepts_relative_and_absolute_references() {
        let relative = FhirUser::parse("Practitioner/p1").unwrap();
        assert_eq!(
            (relative.resource_type.as_str(), relative.id.as_str()),
            ("Practitioner", "p1")
        );
        let absolute = FhirUser::parse("https://ehr.example/fhir/Patient/x").unwrap();
        assert_eq!(absolute.resource_type, "Patient");
        assert!(FhirUser::parse("Observation/o").is_none());
        assert!(FhirUser::parse("Patient/../../etc").is_none());
        assert!(FhirUser::parse("nonsense").is_none());
    }
}
