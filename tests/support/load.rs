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
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, ..."
    // and "status codes: 10 2xx, 0 3xx, 0 4xx, 0 5xx".
    let count = |line: &str, name: &str| -> u64 {
        line.split(',')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(name)?
                    .trim()
                    .split(' ')
                    .next_back()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{what}: no `{name}` in {line:?}"))
    };
    let total = count(requests, "total");
    assert!(total > 0, "{what}: no requests sent:\n{text}");
    assert_eq!(count(requests, "succeeded"), total, "{what}: {requests}");
    assert_eq!(count(requests, "failed"), 0, "{what}: {requests}");
    assert_eq!(count(requests, "errored"), 0, "{what}: {requests}");
    let statuses = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("{what}: no status codes in h2load output:\n{text}"));
    for class in ["3xx", "4xx", "5xx"] {
        assert_eq!(
            count(statuses, class),
            0,
            "{what}: not every answer was a 2xx:\n{text}"
        );
    }
    // A timed run can see one more answer than it counts as done, when a
    // response lands as the measurement window closes.
    assert!(
        count(statuses, "2xx") >= total,
        "{what}: fewer 2xx answers than requests:\n{text}"
    );
}
