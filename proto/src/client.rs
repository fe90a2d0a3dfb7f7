//! Connecting to a coordinator, for the CLI and for workers: the endpoint (plain HTTP/2, or TLS
//! for `https://` URLs) and the interceptor that sends the bearer token on every call.
//!
//! An `https://` coordinator is verified against `ca_cert` (a PEM file) when one is given,
//! else against the operating system's trusted roots. The server name checked is the URL's
//! host, so connect by a name (or IP) the coordinator's certificate lists.

use std::path::Path;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Why a coordinator address or token cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator: {url:?} is not a URL like http://127.0.0.1:50051 ({reason})")]
    Url { url: String, reason: String },
    #[error("ca_cert: cannot read {path}: {reason}")]
    CaCert { path: String, reason: String },
    #[error("token: must be non-empty printable ASCII without spaces")]
    Token,
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token {
            None => Ok(Bearer(None)),
            Some(token) if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) => {
                Err(ClientError::Token)
            }
            Some(token) => format!("Bearer {token}")
                .parse()
                .map(|value| Bearer(Some(value)))
                .map_err(|_| ClientError::Token),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Returns the endpoint of the coordinator at `url` (`http://` or `https://`), with TLS set up
/// for `https://`, verified against `ca_cert` when given.
pub fn endpoint(url: &str, ca_cert: Option<&Path>) -> Result<Endpoint, ClientError> {
    let bad_url = |reason: String| ClientError::Url {
        url: url.to_string(),
        reason,
    };
    // HTTP/2 pings every 20 s, idle or not, find a coordinator that vanished without closing
    // the connection (a frozen VM, a dropped route) within half a minute, instead of when TCP
    // gives up minutes later; workers' calls also carry their own deadlines.
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|error| bad_url(error.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let uri = endpoint.uri().clone();
    match uri.scheme_str() {
        Some("http") => {
            if ca_cert.is_some() {
                return Err(bad_url("a CA certificate needs an https:// URL".into()));
            }
            Ok(endpoint)
        }
        Some("https") => {
            let host = uri
                .host()
                .ok_or_else(|| bad_url("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tls = ClientTlsConfig::new().domain_name(host);
            let tls = match ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|error| ClientError::CaCert {
                        path: path.display().to_string(),
                        reason: error.to_string(),
                    })?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            endpoint
                .tls_config(tls)
                .map_err(|error| bad_url(error.to_string()))
        }
        _ => Err(bad_url("the scheme must be http or https".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ca_files_are_checked() {
        assert!(endpoint("http://127.0.0.1:50051", None).is_ok());
        assert!(endpoint("https://head:50051", None).is_ok());
        for bad in ["127.0.0.1:50051", "ftp://head:1", "not a url"] {
            let error = endpoint(bad, None).unwrap_err().to_string();
            assert!(error.starts_with("coordinator:"), "{bad}: {error}");
        }
        let error = endpoint("http://head:1", Some(Path::new("ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("https"), "{error}");
        let error = endpoint("https://head:1", Some(Path::new("/no/such/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("ca_cert:"), "{error}");
    }

    #[test]
    fn tokens_must_be_ascii() {
        assert!(Bearer::new(Some("token-0123456789")).is_ok());
        for bad in ["t\u{e9}", "two words", "line\nbreak", ""] {
            let refused = matches!(Bearer::new(Some(bad)), Err(ClientError::Token));
            assert!(refused, "{bad:?}");
        }
    }
}
