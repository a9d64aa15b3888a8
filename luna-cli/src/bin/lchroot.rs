use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = luna_cli::args::LchrootCli::parse();
    match luna_cli::lchroot::run(&cli) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("lchroot: error: {e}");
            // 125 like chroot(1) and env(1): lchroot itself failed, not the command.
            std::process::ExitCode::from(125)
        }
    }
}
