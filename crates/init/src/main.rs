//! bakedb-init, PID 1 of a bakedb image: verify the data, apply the read-only profile, exec
//! the engine. Not built yet (issue 4); until then it refuses to run rather than pretend.

fn main() {
    eprintln!("bakedb-init: not implemented yet; images from this version of bakedb do not use it");
    std::process::exit(1);
}
