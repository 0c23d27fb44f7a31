//! The load harness's strace summary parser (benches/load/strace.rs), on
//! tables as strace prints them: the fsync figure of issue #12 rests on it.

#[path = "../benches/load/strace.rs"]
mod strace;

#[test]
fn counts_calls_by_header_even_with_blank_errors_cells() {
    let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 97.52    0.812345         406      2000           fdatasync
  2.11    0.017600          17      1003         3 fsync
  0.37    0.003100        1550         2           msync
------ ----------- ----------- --------- --------- ----------------
100.00    0.833045         277      3005         3 total
";
    let s = strace::parse_summary(text).unwrap();
    assert_eq!(s.get("fdatasync"), Some(&2000));
    assert_eq!(s.get("fsync"), Some(&1003));
    assert_eq!(s.get("msync"), Some(&2));
    assert!(!s.contains_key("total"));
    assert_eq!(strace::sync_calls(&s), 3005);
}

#[test]
fn an_empty_summary_counts_zero_and_a_missing_one_is_an_error() {
    // What strace -c leaves when the process made none of the traced calls.
    assert_eq!(strace::sync_calls(&strace::parse_summary("").unwrap()), 0);
    let empty = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
100.00    0.000000           0         0           total
";
    assert_eq!(
        strace::sync_calls(&strace::parse_summary(empty).unwrap()),
        0
    );
    assert!(strace::parse_summary("strace: exec: No such file or directory\n").is_err());
}

#[test]
fn other_syscalls_do_not_count_and_a_row_without_calls_is_refused() {
    let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 60.00    0.000600          10        60           fsync
 40.00    0.000400           1       400           write
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           2       460           total
";
    let s = strace::parse_summary(text).unwrap();
    assert_eq!(strace::sync_calls(&s), 60);
    let bad = "\
% time     seconds  usecs/call     calls    errors syscall
 60.00    0.000600          10        xx           fsync
";
    assert!(strace::parse_summary(bad).is_err());
}
