use clap::Parser;

fn main() {
    let cli = medgen::cli::Cli::parse();
    if let Err(e) = medgen::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
