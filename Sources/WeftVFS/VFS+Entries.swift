import Foundation
import WeftProto

/// Directories whose every name this agent knows (SPEC.md §12.6, "Names known absent").
///
/// A directory this agent made itself was empty when made; while its lease holds (no recall of
/// it since), every change of its entries by anyone else recalls it first, and this agent's
/// own changes are recorded here as they return. So a name missing from the set does not exist,
/// and a `lookup` of it needs no call to the home: creating files in a new directory costs one
/// round trip each instead of two. Guarded by `VFS.lock`.
struct CompleteDirectories {
    /// Names of each directory, with the lease token taken before the directory was made.
    var entries: [InodeID: (token: UInt64, names: Set<[UInt8]>)] = [:]
    var nameCount = 0
    /// Most names kept over all directories; beyond it, the oldest knowledge is dropped.
    static let namesMax = 1 << 20

    mutating func forget(_ directory: InodeID) {
        if let removed = entries.removeValue(forKey: directory) { nameCount -= removed.names.count }
    }
}

extension VFS {
    /// True if `name` is known not to exist in `parent`: no call to the home is needed.
    func knownAbsent(_ parent: InodeID, _ name: [UInt8]) -> Bool {
        guard leasesEnabled else { return false }
        return lock.withLock {
            guard let known = complete.entries[parent] else { return false }
            guard leaseCache.mayCache(kernelIno(parent), since: known.token) else {
                complete.forget(parent)
                return false
            }
            return !known.names.contains(name)
        }
    }

    /// After this agent made directory `directory` (empty), with `token` taken before the call.
    func madeEmptyDirectory(_ directory: InodeID, since token: UInt64) {
        guard leasesEnabled, leaseCache.mayCache(kernelIno(directory), since: token) else { return }
        lock.withLock {
            if complete.nameCount >= CompleteDirectories.namesMax {
                complete.entries.removeAll()
                complete.nameCount = 0
            }
            complete.entries[directory] = (token, [])
        }
    }

    /// After this agent's own change of entries succeeded: `added` and `removed` names of
    /// `directory`, as it now is at the home.
    func entriesChanged(_ directory: InodeID, added: [UInt8]? = nil, removed: [UInt8]? = nil) {
        lock.withLock {
            guard var known = complete.entries[directory] else { return }
            complete.entries[directory] = nil   // no copy-on-write of the set while it changes
            if let removed, known.names.remove(removed) != nil { complete.nameCount -= 1 }
            if let added, known.names.insert(added).inserted { complete.nameCount += 1 }
            complete.entries[directory] = known
        }
    }

    /// Runs an own change of the entries of `directories`. If it fails, what was known of them
    /// is dropped: a failed call (a timeout, a lost connection) may still have been applied.
    func changingEntries<T>(of directories: InodeID..., change: () throws -> T) throws -> T {
        do {
            return try change()
        } catch {
            lock.withLock { for directory in directories { complete.forget(directory) } }
            throw error
        }
    }
}
