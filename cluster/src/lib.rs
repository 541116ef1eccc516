//! fabvm's cluster layer (no KVM): the etcd host registry, the compact summaries of the pages
//! each host holds, the page service's wire code and client, and placement ranking.
