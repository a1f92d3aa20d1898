//! FHIR wire formats and content negotiation (http://hl7.org/fhir/R4/http.html#mime-type):
//! the request body's format comes from `Content-Type`; the response's from `_format`, else
//! `Accept`, else JSON.

use axum::http::{header, HeaderMap};

use crate::error::ApiError;

/// `Content-Type` of every JSON answer.
pub const FHIR_JSON_UTF8: &str = "application/fhir+json; charset=utf-8";
/// `Content-Type` of every XML answer.
pub const FHIR_XML_UTF8: &str = "application/fhir+xml; charset=utf-8";

/// A FHIR serialization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    /// The `Content-Type` header value for this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => FHIR_JSON_UTF8,
            Format::Xml => FHIR_XML_UTF8,
        }
    }

    /// Reads a MIME type (parameters ignored) or a `_format` shorthand.
    fn from_mime(mime: &str) -> Option<Format> {
        let essence = mime.split(';').next().unwrap_or_default().trim();
        match essence.to_ascii_lowercase().as_str() {
            "application/fhir+json" | "application/json" | "json" | "application/json+fhir" => {
                Some(Format::Json)
            }
            "application/fhir+xml"
            | "application/xml"
            | "text/xml"
            | "xml"
            | "application/xml+fhir" => Some(Format::Xml),
            _ => None,
        }
    }
}

/// The format of a request body, from its `Content-Type`.
///
/// # Errors
/// 415 when the header is missing or names something other than FHIR JSON or XML.
pub fn request_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "Content-Type is required: application/fhir+json or application/fhir+xml".into(),
            )
        })?;
    Format::from_mime(value).ok_or_else(|| {
        ApiError::UnsupportedMediaType(
            "Content-Type must be application/fhir+json or application/fhir+xml".into(),
        )
    })
}

/// The format of the response: `_format` wins over `Accept`; JSON when neither decides.
///
/// # Errors
/// 406 when `_format` names an unknown format, or `Accept` lists only types this server cannot
/// produce (without a wildcard).
pub fn response_format(
    format_parameter: Option<&str>,
    headers: &HeaderMap,
) -> Result<Format, ApiError> {
    if let Some(requested) = format_parameter {
        return Format::from_mime(requested).ok_or_else(|| {
            ApiError::NotAcceptable("_format must be json or xml (or a FHIR MIME type)".into())
        });
    }
    let Some(accept) = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
    else {
        return Ok(Format::Json);
    };
    let mut best: Option<(f32, Format)> = None;
    let mut wildcard = false;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let mime = parts.next().unwrap_or_default().trim();
        let quality = parts
            .filter_map(|parameter| parameter.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if quality <= 0.0 {
            continue;
        }
        if mime == "*/*" || mime == "application/*" {
            wildcard = true;
            continue;
        }
        if let Some(format) = Format::from_mime(mime) {
            if best.is_none_or(|(best_quality, _)| quality > best_quality) {
                best = Some((quality, format));
            }
        }
    }
    match best {
        Some((_, format)) => Ok(format),
        None if wildcard || accept.trim().is_empty() => Ok(Format::Json),
        None => Err(ApiError::NotAcceptable(
            "this server answers application/fhir+json or application/fhir+xml".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_str(value).unwrap());
        map
    }

    #[test]
    fn content_type_decides_the_request_format() {
        let json = headers(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8");
        assert_eq!(request_format(&json).unwrap(), Format::Json);
        let xml = headers(header::CONTENT_TYPE, "application/fhir+xml");
        assert_eq!(request_format(&xml).unwrap(), Format::Xml);
        let form = headers(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        assert_eq!(request_format(&form).unwrap_err().status().as_u16(), 415);
        assert_eq!(
            request_format(&HeaderMap::new())
                .unwrap_err()
                .status()
                .as_u16(),
            415
        );
    }

    #[test]
    fn format_parameter_beats_accept_and_quality_orders_accept() {
        let accept_xml = headers(header::ACCEPT, "application/fhir+xml");
        assert_eq!(
            response_format(Some("json"), &accept_xml).unwrap(),
            Format::Json
        );
        assert_eq!(response_format(None, &accept_xml).unwrap(), Format::Xml);
        let weighted = headers(
            header::ACCEPT,
            "application/fhir+xml;q=0.5, application/fhir+json;q=0.9",
        );
        assert_eq!(response_format(None, &weighted).unwrap(), Format::Json);
        let browser = headers(header::ACCEPT, "text/html,*/*;q=0.8");
        assert_eq!(response_format(None, &browser).unwrap(), Format::Json);
        let only_html = headers(header::ACCEPT, "text/html");
        assert_eq!(
            response_format(None, &only_html)
                .unwrap_err()
                .status()
                .as_u16(),
            406
        );
        assert_eq!(
            response_format(Some("turtle"), &HeaderMap::new())
                .unwrap_err()
                .status()
                .as_u16(),
            406
        );
    }
}
