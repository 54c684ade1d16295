#if canImport(Glibc)
import Glibc
#endif

/// POSIX permission rules, evaluated against the caller's credentials.
public enum Access {
    public static let read: UInt32 = 4
    public static let write: UInt32 = 2
    public static let execute: UInt32 = 1

    /// Throws EACCES unless `credentials` may access `attributes` with every bit of `mask`.
    public static func check(_ attributes: Attributes, _ credentials: Credentials, _ mask: UInt32) throws {
        if mask == 0 { return }
        if credentials.isRoot {
            // Root bypasses read/write; execute needs some x bit (or a directory).
            if mask & execute != 0 && !attributes.isDirectory && attributes.mode & 0o111 == 0 {
                throw WeftError.accessDenied
            }
            return
        }
        let bits: UInt32
        if credentials.uid == attributes.uid {
            bits = (attributes.mode >> 6) & 7
        } else if credentials.isMember(of: attributes.gid) {
            bits = (attributes.mode >> 3) & 7
        } else {
            bits = attributes.mode & 7
        }
        if bits & mask != mask { throw WeftError.accessDenied }
    }

    /// The sticky-directory rule for removing or renaming `victim` out of `directory` (EPERM).
    public static func checkSticky(directory: Attributes, victim: Attributes, _ credentials: Credentials) throws {
        guard directory.mode & UInt32(S_ISVTX) != 0, !credentials.isRoot else { return }
        if credentials.uid != directory.uid && credentials.uid != victim.uid { throw WeftError.notPermitted }
    }

    public static func isOwnerOrRoot(_ attributes: Attributes, _ credentials: Credentials) -> Bool {
        credentials.isRoot || credentials.uid == attributes.uid
    }
}

extension SetAttributes {
    /// Applies the mode, owner and time changes to `attributes` with POSIX's rules for who may
    /// make them (EPERM, or EACCES for setting the times to now without write permission), as
    /// the hub does for every `setattr`. `size` and `ctime` are the caller's: a truncate needs
    /// the file's layout, and the caller stamps ctime once everything applied.
    public func applyModeOwnerAndTimes(to attributes: inout Attributes, _ credentials: Credentials,
                                       now: Int64) throws {
        let isOwner = Access.isOwnerOrRoot(attributes, credentials)
        if let mode {
            guard isOwner else { throw WeftError.notPermitted }
            var newMode = (attributes.mode & UInt32(S_IFMT)) | (mode & 0o7777)
            if !credentials.isRoot && !credentials.isMember(of: attributes.gid) { newMode &= ~UInt32(S_ISGID) }
            attributes.mode = newMode
        }
        if uid != nil || gid != nil {
            let newUID = uid ?? attributes.uid
            let newGID = gid ?? attributes.gid
            if !credentials.isRoot {
                // POSIX chown: only root gives a file away; the owner may change its group to one it belongs to.
                guard credentials.uid == attributes.uid, newUID == attributes.uid else { throw WeftError.notPermitted }
                guard newGID == attributes.gid || credentials.isMember(of: newGID) else { throw WeftError.notPermitted }
            }
            if !attributes.isDirectory && (newUID != attributes.uid || newGID != attributes.gid || !credentials.isRoot) {
                attributes.mode &= ~UInt32(S_ISUID)
                if attributes.mode & 0o010 != 0 { attributes.mode &= ~UInt32(S_ISGID) }
            }
            attributes.uid = newUID
            attributes.gid = newGID
        }
        for (setting, isAccessTime) in [(atime, true), (mtime, false)] {
            guard let setting else { continue }
            switch setting {
            case .now:
                if !isOwner && !byHandle { try Access.check(attributes, credentials, Access.write) }
                if isAccessTime { attributes.atimeNs = now } else { attributes.mtimeNs = now }
            case .nanoseconds(let ns):
                guard isOwner else { throw WeftError.notPermitted }
                if isAccessTime { attributes.atimeNs = ns } else { attributes.mtimeNs = ns }
            }
        }
    }
}
