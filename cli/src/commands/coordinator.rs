//! `deepmad coordinator`: loads the settings, binds, and runs the coordinator until shutdown.

use std::io::Write;

use deepmad_coordinator::app;
use deepmad_coordinator::settings::{self, Overrides};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::CoordinatorArgs;
use crate::Failure;

pub async fn run(
    args: &CoordinatorArgs,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let overrides = Overrides {
        listen: args.listen.clone(),
        database_url: args.database.clone(),
    };
    let settings = settings::load(args.config.as_deref(), settings::process_env(), &overrides)
        .map_err(|error| Failure::usage(error.to_string()))?;
    if args.check_config {
        writeln!(out, "settings ok")?;
        writeln!(out, "listen {}", settings.listen)?;
        writeln!(out, "database {}", redact(&settings.database_url))?;
        writeln!(
            out,
            "auth {}",
            if settings.tokens.is_enabled() {
                "on"
            } else {
                "off (loopback only)"
            }
        )?;
        writeln!(
            out,
            "tls {}",
            if settings.tls.is_some() { "on" } else { "off" }
        )?;
        match settings.dashboard_listen {
            Some(address) => writeln!(out, "dashboard {address}")?,
            None => writeln!(out, "dashboard off")?,
        }
        return Ok(());
    }
    let bind_failure = |address: std::net::SocketAddr, error: std::io::Error| Failure {
        code: 1,
        message: format!("cannot listen on {address}: {error}"),
    };
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| bind_failure(settings.listen, e))?;
    let metrics_listener = match settings.metrics_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| bind_failure(address, e))?,
        ),
        None => None,
    };
    let dashboard_listener = match settings.dashboard_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| bind_failure(address, e))?,
        ),
        None => None,
    };
    let internal = |error: deepmad_coordinator::error::Error| Failure {
        code: 1,
        message: error.to_string(),
    };
    let coordinator = app::open(&settings, shutdown.clone())
        .await
        .map_err(internal)?;
    let listeners = app::Listeners {
        grpc: listener,
        metrics: metrics_listener,
        dashboard: dashboard_listener,
    };
    app::run_all(&settings, coordinator, listeners, shutdown)
        .await
        .map_err(internal)
}

/// Hides the credentials in a database URL: the password of its user part, and the value of
/// every query parameter whose name holds `password`, `secret` or `token` (libpq and sqlx
/// read `?password=` and `?sslpassword=` too).
fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_user_password(base);
    if let Some(query) = query {
        let pairs: Vec<String> = query.split('&').map(redact_parameter).collect();
        redacted = format!("{redacted}?{}", pairs.join("&"));
    }
    redacted
}

fn redact_user_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn redact_parameter(pair: &str) -> String {
    let Some((name, _)) = pair.split_once('=') else {
        return pair.to_string();
    };
    let lower = name.to_ascii_lowercase();
    if ["password", "secret", "token"]
        .iter()
        .any(|word| lower.contains(word))
    {
        format!("{name}=***")
    } else {
        pair.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    /// Issue 24, item 10: `--check-config` printed `?password=...` from a database URL.
    #[test]
    fn credentials_are_hidden_wherever_the_url_carries_them() {
        let cases = [
            ("postgres://u:pw@db:5432/d", "postgres://u:***@db:5432/d"),
            (
                "postgres://u@db/d?password=pw",
                "postgres://u@db/d?password=***",
            ),
            (
                "postgres://db/d?sslmode=require&sslpassword=k&user=u",
                "postgres://db/d?sslmode=require&sslpassword=***&user=u",
            ),
            ("postgres://u:p@ss@db/d", "postgres://u:***@db/d"),
            ("sqlite://deepmad.db", "sqlite://deepmad.db"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
