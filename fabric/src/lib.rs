//! fabvm's memory fabric: content identities of guest pages and what is built on them.
//! No KVM dependency, so everything here is testable anywhere.
