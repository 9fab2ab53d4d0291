//! The `presenced` binary: parses the command line and config, sets up logging, binds,
//! and hands over to [`presenced::server`].

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use presenced::auth::Authenticator;
use presenced::config::{Config, Dur};
use presenced::server::{shutdown_signal, App};

/// Exit code for a bad configuration (EX_CONFIG-style, as linkerd does with 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "presenced", version, about = "Real-time presence service")]
struct Cli {
    /// YAML config file (every key can also be set as PRESENCE_<SECTION>__<KEY>).
    #[arg(long, short, global = true, env = "PRESENCE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (embedded store by default; no external service needed).
    Serve {
        /// Development helpers: `GET /dev/token?sub=alice` mints tokens for the live page.
        #[arg(long)]
        dev: bool,
    },
    /// Mint a development JWT signed with the configured HS256 secret.
    Token {
        /// The user the token speaks for (`sub`).
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 24h, 30m (default: auth.jwt_ttl).
        #[arg(long)]
        ttl: Option<String>,
        /// Space-separated scopes, e.g. "presence:admin".
        #[arg(long)]
        scope: Option<String>,
    },
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Change the key of the data at rest (presence.redb, sinks.redb) with the node
    /// stopped: rewrites them from the configured key (or plain text) to the new one.
    /// Then point store.encryption_key_file at the new key and start the node.
    Rekey {
        /// The new key: 32 random bytes, or 64 hex digits (`openssl rand -hex 32`).
        #[arg(long, required_unless_present = "decrypt")]
        new_key_file: Option<PathBuf>,
        /// Write the data back in plain text instead (then remove the key setting).
        #[arg(long, conflicts_with = "new_key_file")]
        decrypt: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("presenced: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Serve { dev } => serve(config, dev),
        Command::Token { sub, ttl, scope } => token(&config, &sub, ttl.as_deref(), scope.as_deref()),
        Command::Rekey { new_key_file, .. } => rekey(&config, new_key_file.as_deref()),
        Command::Config => match config.printable().and_then(|v| serde_yaml::to_string(&v)) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("presenced: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn token(config: &Config, sub: &str, ttl: Option<&str>, scope: Option<&str>) -> ExitCode {
    let ttl = match ttl.map(Dur::parse).transpose() {
        Ok(t) => t.unwrap_or(config.auth.jwt_ttl),
        Err(e) => {
            eprintln!("presenced token: --ttl: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = presenced::core::validate_id("--sub", sub, config.limits.max_user_id_len) {
        eprintln!("presenced token: {e}");
        return ExitCode::from(2);
    }
    let secret_file = config.service.data_dir.join("jwt.secret");
    let new_secret = config.auth.jwt_secret.is_empty() && !secret_file.exists();
    let auth = match Authenticator::from_config(&config.auth, &config.service.data_dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("presenced: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if new_secret {
        // Not an error (a backend may mint before the first start), but the usual mistake
        // is running `token` from another directory than `serve`: say where it signed.
        let at = std::fs::canonicalize(&secret_file).unwrap_or(secret_file);
        eprintln!(
            "presenced token: no signing secret yet, so a new one was created at {}; only a server using this \
             data dir (service.data_dir, PRESENCE_SERVICE__DATA_DIR) or auth.jwt_secret with the same value accepts \
             this token",
            at.display()
        );
    }
    match auth.mint(sub, ttl.0, scope) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presenced token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn rekey(config: &Config, new_key_file: Option<&std::path::Path>) -> ExitCode {
    let to = match new_key_file.map(presenced::at_rest::Sealer::from_file).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("presenced rekey: --new-key-file: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match presenced::server::rekey(config, to.as_ref()) {
        Ok(lines) if lines.is_empty() => {
            println!("nothing to rekey under {}", config.service.data_dir.display());
            ExitCode::SUCCESS
        }
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presenced rekey: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, dev: bool) -> ExitCode {
    if let Err(e) = presenced::telemetry::init_logging(&config.logging) {
        eprintln!("presenced: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let foreign: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("PRESENCE_") && k != "PRESENCE_CONFIG" && !presenced::config::is_override(k))
        .collect();
    if !foreign.is_empty() {
        // Kubernetes injects PRESENCE_PORT, PRESENCE_SERVICE_HOST, ... for a Service named
        // `presence`: not ours, and not a reason to refuse the start.
        tracing::debug!(?foreign, "ignored PRESENCE_* variables that are not overrides (PRESENCE_<SECTION>__<KEY>)");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.service.worker_threads > 0 {
        builder.worker_threads(config.service.worker_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presenced: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let addr = format!("{}:{}", config.service.host, config.service.port);
        let mut shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(shutdown_signal());
        // Bound early only when the store is late: the port then answers 503 meanwhile.
        let mut early: Option<std::net::TcpListener> = None;
        let first = tokio::select! {
            built = App::build(config.clone()) => built,
            _ = shutdown.as_mut() => return ExitCode::SUCCESS, // stopped while starting
        };
        let built = match first {
            Err(e) if e.store_unreachable() && !config.store.fail_fast => {
                let listener = match bind_early(&addr) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("presenced: cannot listen on {addr} (service.host, service.port): {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let waited = presenced::server::wait_for_store(&config, &listener, e, shutdown.as_mut()).await;
                early = Some(listener);
                match waited {
                    Ok(Some(app)) => Ok(app),
                    Ok(None) => return ExitCode::SUCCESS, // stopped while waiting
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        let app = match built {
            Ok(mut a) => {
                a.dev = dev;
                if dev {
                    tracing::warn!("--dev: GET /dev/token mints tokens for anyone; never use this in production");
                }
                a
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("presenced: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let bound = match early {
            Some(l) => tokio::net::TcpListener::from_std(l),
            None => tokio::net::TcpListener::bind(&addr).await,
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                eprintln!("presenced: cannot listen on {addr} (service.host, service.port): {e}");
                app.svc.store.shutdown().await;
                return ExitCode::FAILURE;
            }
        };
        let grpc_addr = format!("{}:{}", app.config.service.host, app.config.service.grpc_port);
        let grpc = match tokio::net::TcpListener::bind(&grpc_addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("presenced: cannot listen on {grpc_addr} (service.grpc_port): {e}");
                app.svc.store.shutdown().await;
                return ExitCode::FAILURE;
            }
        };
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
        let grpc_local = grpc.local_addr().map(|a| a.to_string()).unwrap_or(grpc_addr);
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        tracing::info!(http = %local, grpc = %grpc_local, node_id = %app.svc.node_id, backend = app.backend, workers, "presenced listening");
        match app.serve_all(listener, Some(grpc), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("presenced: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Binds the HTTP port before the app exists (non-blocking, for tokio), as tokio's own
/// `bind` does: address reuse, so a restart does not wait out TIME_WAIT.
fn bind_early(addr: &str) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
    for a in addr.to_socket_addrs()? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(1024)) {
            Ok(l) => return l.into_std(),
            Err(e) => last = e,
        }
    }
    Err(last)
}
