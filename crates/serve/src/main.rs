//! bakedb-serve, the read-only SQLite HTTP/JSON server of the FROM-scratch image. Not built
//! yet (issue 5); until then it refuses to run rather than pretend.

fn main() {
    eprintln!("bakedb-serve: not implemented yet");
    std::process::exit(1);
}
