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
        Command::Config => match serde_yaml::to_string(&config.redacted()) {
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

fn serve(config: Config, dev: bool) -> ExitCode {
    if let Err(e) = presenced::telemetry::init_logging(&config.logging) {
        eprintln!("presenced: {e}");
        return ExitCode::from(EXIT_CONFIG);
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
        let app = match App::build(config).await {
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
        let listener = match tokio::net::TcpListener::bind(&addr).await {
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
        match app.serve_all(listener, Some(grpc), shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("presenced: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
