fn main() -> std::process::ExitCode {
    luna_cli::lpower_main(std::env::args_os())
}
