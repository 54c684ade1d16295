import Foundation

/// This process's memory mappings as /proc/self/smaps describes them (Linux).
public enum Mappings {
    /// Whether this kernel has transparent huge pages (else MADV_HUGEPAGE fails and memory
    /// stays in small pages).
    public static let kernelHasHugePages =
        FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/enabled")

    /// The VmFlags of the mapping that holds `address` ("hg": advised MADV_HUGEPAGE), nil if
    /// no mapping does.
    public static func flags(of address: UnsafeRawPointer) -> [String]? {
        // Read to the end: /proc files report a size of 0.
        guard let data = try? FileHandle(forReadingFrom: URL(fileURLWithPath: "/proc/self/smaps")).readToEnd(),
              let smaps = String(data: data, encoding: .utf8) else { return nil }
        let target = UInt(bitPattern: address)
        var inside = false
        for line in smaps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if let range = fields.first, range.contains("-"), !range.hasSuffix(":") {
                let bounds = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
                inside = bounds.count == 2 && bounds[0] <= target && target < bounds[1]
            } else if inside, fields.first == "VmFlags:" {
                return fields.dropFirst().map(String.init)
            }
        }
        return nil
    }
}
