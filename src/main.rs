//! The `weightdiff` binary: the command line lives in the library ([`weightdiff::cli`]),
//! shared with the Python package's console script.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(weightdiff::cli::main(std::env::args_os()))
}
