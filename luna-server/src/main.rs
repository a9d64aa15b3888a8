use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use luna_server::{config, server};

/// The boot path answers thousands of small requests per second, each a handful of short-lived
/// allocations (hyper's buffers, the rendered script); glibc's malloc spent about a tenth of
/// the server's CPU there in `bench-http`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// luna-server: the master of a luna cluster (store, REST API, DHCP, TFTP, HTTP boot, tracker).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/luna/luna.toml", env = "LUNA_CONFIG")]
    config: PathBuf,
    /// Print the configuration keys with their documented defaults and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the store, the admin token file, the cluster object and the admin API's
    /// certificate (idempotent: what exists is kept).
    Init {
        /// Only the admin API's certificate (no store access): for upgrades and external stores.
        #[arg(long)]
        tls_only: bool,
        /// Also copy the CA certificate clients trust to FILE (mode 0644), e.g. /etc/luna/ca.pem.
        #[arg(long, value_name = "FILE")]
        export_ca: Option<PathBuf>,
    },
    /// Serve (the default).
    Serve,
}

/// Exit status for a refusal that a restart cannot cure (sysexits' EX_CONFIG): a bad
/// configuration file or a store written by a newer luna-server. The systemd unit lists it in
/// `RestartPreventExitStatus=`, so the service stays down instead of looping.
const EX_CONFIG: u8 = 78;

/// What `init` says about the admin API's certificate.
fn print_tls(tls: &luna_server::tls::Ensured) {
    use luna_server::tls::Ensured;
    match tls {
        Ensured::Configured { cert } => println!("admin API certificate: {} (configured)", cert.display()),
        Ensured::Kept { cert, ca } => {
            println!("admin API certificate kept in {}; clients trust {}", cert.display(), ca.display())
        }
        Ensured::Generated { cert, ca, new_ca, names } => {
            if *new_ca {
                println!("certificate authority created: {}", ca.display());
            }
            println!(
                "admin API certificate written to {} for {}; clients trust {} (luna --ca, LUNA_CA)",
                cert.display(),
                names.join(", "),
                ca.display()
            );
        }
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            if refused_for_good(&e) {
                std::process::ExitCode::from(EX_CONFIG)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn refused_for_good(e: &anyhow::Error) -> bool {
    use luna_server::store::StoreError;
    let schema = |s: &StoreError| matches!(s, StoreError::SchemaTooNew { .. } | StoreError::SchemaUnknown(_));
    e.chain().any(|cause| {
        cause.is::<config::ConfigError>()
            || cause.downcast_ref::<StoreError>().is_some_and(schema)
            || match cause.downcast_ref::<server::ServerError>() {
                Some(server::ServerError::Store(s)) => schema(s),
                // A missing or unusable certificate: restarting cannot cure it either.
                Some(server::ServerError::Config(_) | server::ServerError::Power(_) | server::ServerError::Tls(_)) => {
                    true
                }
                _ => false,
            }
    })
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_config {
        print!("{}", config::documented_defaults());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // colours only for a person at a terminal, not in the journal or a log file
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = if cli.config.exists() || cli.config != std::path::Path::new("/etc/luna/luna.toml") {
        config::Config::load(&cli.config)?
    } else {
        config::Config::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Init { tls_only, export_ca } => {
                let tls = if tls_only {
                    luna_server::tls::ensure(&config)?
                } else {
                    let r = server::init(&config).await?;
                    println!("cluster {} ready in {}", r.cluster, config.store);
                    if r.token_created {
                        println!("admin token written to {}", r.token_file.display());
                    } else {
                        println!("admin token kept in {}", r.token_file.display());
                    }
                    r.tls
                };
                print_tls(&tls);
                if let Some(dest) = export_ca {
                    match luna_server::tls::export_ca(&config, &dest)? {
                        true => println!("CA certificate copied to {}", dest.display()),
                        false => println!(
                            "[http] tls_cert is configured: luna has no CA of its own to copy to {}; give clients \
                             the CA of that certificate (luna --ca, LUNA_CA)",
                            dest.display()
                        ),
                    }
                }
                Ok(())
            }
            Command::Serve => {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    server::shutdown_signal().await;
                    let _ = tx.send(true);
                });
                server::serve(config, rx).await.map_err(anyhow::Error::from)
            }
        }
    })
}
