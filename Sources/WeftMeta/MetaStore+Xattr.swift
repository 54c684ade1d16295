import WeftProto
#if canImport(Glibc)
import Glibc
#endif

extension MetaStore {
    /// The namespace rules of Linux xattrs: user.* follows file permissions on regular files and
    /// directories, trusted.* is root's, security.* is readable by all and writable by the owner,
    /// system.* (ACLs) is not supported.
    private func checkXattr(_ credentials: Credentials, _ attributes: Attributes, name: [UInt8], write: Bool) throws {
        if name.isEmpty || name.count > Limits.xattrNameMaxBytes { throw WeftError.rangeError }
        let text = String(decoding: name, as: UTF8.self)
        if text.hasPrefix("user.") {
            if !attributes.isRegular && !attributes.isDirectory { throw write ? WeftError.notPermitted : WeftError.noData }
            if write && attributes.isDirectory && attributes.mode & UInt32(S_ISVTX) != 0
                && !Access.isOwnerOrRoot(attributes, credentials) {
                throw WeftError.notPermitted
            }
            try Access.check(attributes, credentials, write ? Access.write : Access.read)
        } else if text.hasPrefix("trusted.") {
            if !credentials.isRoot { throw write ? WeftError.notPermitted : WeftError.noData }
        } else if text.hasPrefix("security.") {
            if write && !Access.isOwnerOrRoot(attributes, credentials) { throw WeftError.notPermitted }
        } else {
            throw WeftError.notSupported
        }
    }

    public func getxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        try read { t in
            try checkXattr(credentials, try t.inode(ino).attributes, name: name, write: false)
            guard let value = try db.get(Key.xattr(ino, name)) else { throw WeftError.noData }
            return value
        }
    }

    public func setxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        try mutate { t in
            var record = try t.inode(ino)
            try checkXattr(credentials, record.attributes, name: name, write: true)
            if value.count > Limits.xattrValueMaxBytes { throw WeftError(E2BIG) }
            let exists = try db.get(Key.xattr(ino, name)) != nil
            if flags.contains(.create) && exists { throw WeftError.exists }
            if flags.contains(.replace) && !exists { throw WeftError.noData }
            t.batch.put(Key.xattr(ino, name), value)
            record.attributes.ctimeNs = t.now
            t.put(record)
        }
    }

    public func listxattr(_ credentials: Credentials, ino: InodeID) throws -> [[UInt8]] {
        try read { t in
            _ = try t.inode(ino)
            let prefix = Key.xattrPrefix(ino)
            var names: [[UInt8]] = []
            try db.scan(prefix: prefix) { key, _ in
                let name = Array(key[prefix.count...])
                if credentials.isRoot || !name.starts(with: Array("trusted.".utf8)) { names.append(name) }
                return true
            }
            return names
        }
    }

    public func removexattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws {
        try mutate { t in
            var record = try t.inode(ino)
            try checkXattr(credentials, record.attributes, name: name, write: true)
            guard try db.get(Key.xattr(ino, name)) != nil else { throw WeftError.noData }
            t.batch.delete(Key.xattr(ino, name))
            record.attributes.ctimeNs = t.now
            t.put(record)
        }
    }
}
