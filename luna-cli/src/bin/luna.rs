fn main() -> std::process::ExitCode {
    luna_cli::main_with_args(std::env::args_os())
}
