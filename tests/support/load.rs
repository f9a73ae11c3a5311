//! Reading h2load's summary in tests that run it as a load generator.

use std::process::Output;

/// Panics unless h2load sent requests and every one got a 2xx answer.
pub fn assert_h2load_all_succeeded(output: &Output, what: &str) {
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{what}: h2load failed:\n{text}");
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("{what}: no summary in h2load output:\n{text}"));
    let field = |name: &str| -> u64 {
        requests
            .split(',')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(name)?
                    .trim()
                    .split(' ')
                    .next_back()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{what}: no `{name}` in {requests:?}"))
    };
    let total = field("total");
    assert!(total > 0, "{what}: no requests sent:\n{text}");
    assert_eq!(field("succeeded"), total, "{what}: {requests}");
    assert_eq!(field("failed"), 0, "{what}: {requests}");
    assert_eq!(field("errored"), 0, "{what}: {requests}");
    assert!(
        text.contains(&format!("status codes: {total} 2xx,")),
        "{what}: not every answer was a 2xx:\n{text}"
    );
}
